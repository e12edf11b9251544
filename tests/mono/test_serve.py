"""Serving without LMDeploy: the OpenAI message parser, this project's own OpenAI-compatible server, ``mono chat``
against a running server, ``mono serve --dry-run`` and ``mono bench-serve`` (own engine, on a tiny model)."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest
import torch
from PIL import Image

from mono import cli
from mono.deploy.client import ServerClient, ServerError
from mono.deploy.openai_api import ChatRequest, ProtocolError, image_part, parse_messages, user_message
from mono.deploy.own_server import OwnEngine, make_server

from .conftest import WORDS, tiny_chat_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_serve")
    model, tok = tiny_chat_model()
    # Random weights answer with special tokens (decoded to ""); make greedy answers words, so comparisons bite.
    words = set(tok.convert_tokens_to_ids(WORDS))
    with torch.no_grad():
        head = model.language_model.output.weight
        head[[i for i in range(head.shape[0]) if i not in words]] = 0.0
        head[list(words)] *= 4.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    Image.new("RGB", (120, 60), (200, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (50, 90), (30, 30, 200)).save(folder / "blue.png")
    return folder


@pytest.fixture(scope="module")
def server(model_dir):
    engine = OwnEngine(model_dir)
    srv = make_server(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", engine
    srv.shutdown()
    srv.server_close()


def _local_chat(engine: OwnEngine, question: str, images=(), history=None, max_new_tokens=6) -> str:
    from mono.processing import load_images

    pixel_values, num_patches = None, None
    if images:
        cfg = engine.model.config
        pixel_values, num_patches = load_images(list(images), image_size=cfg.image_size,
                                                max_num=cfg.max_dynamic_patch, use_thumbnail=cfg.use_thumbnail)
    return engine.model.chat(engine.tokenizer, pixel_values, question, dict(max_new_tokens=max_new_tokens),
                             history=history, num_patches_list=num_patches)


# ---------------------------------------------------------------------------------------------- protocol
def test_parse_messages_builds_history_images_and_placeholders(model_dir):
    red = image_part(model_dir / "red.png")
    req = parse_messages([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [red, {"type": "text", "text": "what is in the image"}]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "how are you"},
    ])
    assert req.system == "be brief"
    assert req.history == [("<image>\nwhat is in the image", "a cat")]
    assert req.question == "how are you"
    assert req.images == [(model_dir / "red.png").read_bytes()]
    # Placeholders already in the text are kept where the user put them.
    req = parse_messages([user_message("left <image> right <image>", [model_dir / "red.png", model_dir / "blue.png"])])
    assert req.question == "left <image> right <image>" and len(req.images) == 2


@pytest.mark.parametrize("messages, where", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1]: expected a assistant"),
    ([{"role": "robot", "content": "a"}], "messages[0]: role 'robot'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "messages[1]: a system message"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
     "messages[0] part 0: only data: URLs"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}],
     "messages[0] part 0: the base64 payload"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "messages[0] part 0: unsupported content part type"),
    ([{"role": "user", "content": "<image> what"}], "messages[0]: the text holds <image> but"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "the last message must be a user"),
])
def test_parse_messages_errors_name_the_message(messages, where):
    with pytest.raises(ProtocolError, match=None) as exc:
        parse_messages(messages)
    assert where in str(exc.value)


# ---------------------------------------------------------------------------------------------- own server
def test_server_answers_like_the_model(server, model_dir):
    url, engine = server
    client = ServerClient(url)
    assert client.models() == [model_dir.name]
    messages = [user_message("what is in the image", [model_dir / "red.png"])]
    body = client.chat(messages, max_tokens=6)
    expected = _local_chat(engine, "what is in the image", [model_dir / "red.png"])
    assert len(expected.split()) >= 3, expected
    assert body["choices"][0]["message"]["content"] == expected
    usage = body["usage"]
    assert 1 <= usage["completion_tokens"] <= 6 and usage["prompt_tokens"] > 4 * 2  # >= one tile of 4 visual tokens
    # Streaming gives the same text, chunk by chunk, then the usage chunk.
    events = list(client.stream(messages, max_tokens=6))
    assert "".join(e.text for e in events) == expected
    assert events[-1].completion_tokens == usage["completion_tokens"]
    # A second turn carries the history (and the image of the first turn).
    messages += [{"role": "assistant", "content": expected}, {"role": "user", "content": "how are you"}]
    second = client.chat(messages, max_tokens=6)["choices"][0]["message"]["content"]
    assert second == _local_chat(engine, "how are you", [model_dir / "red.png"],
                                 history=[("<image>\nwhat is in the image", expected)])


def test_server_ignore_eos_decodes_exactly_max_tokens(server):
    url, _ = server
    body = ServerClient(url).chat([user_message("hello world")], max_tokens=7, extra={"ignore_eos": True})
    assert body["usage"]["completion_tokens"] == 7
    assert body["choices"][0]["finish_reason"] == "length"


def test_server_errors_are_clear(server):
    url, _ = server
    client = ServerClient(url)
    with pytest.raises(ServerError, match="HTTP 400.*messages\\[0\\]: expected a user message"):
        client.chat([{"role": "assistant", "content": "hi"}])
    req = urllib.request.Request(url + "/v1/chat/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req)
    assert exc.value.code == 400 and "not JSON" in json.loads(exc.value.read())["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(url + "/v2/nothing")
    assert exc.value.code == 404
    bad_image = {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}, {"type": "text", "text": "x"}]}
    with pytest.raises(ServerError, match="HTTP 400.*image could not be decoded"):
        client.chat([bad_image])


def test_engine_frees_itself_when_the_consumer_stops(model_dir):
    engine = OwnEngine(model_dir)
    events = engine.generate(ChatRequest("hello world"), max_new_tokens=50, ignore_eos=True)
    first = next(events)
    assert first.tokens == 1
    events.close()  # a client that went away: generation is cancelled and the engine lock released
    assert not engine._lock.locked()
    assert len(list(engine.generate(ChatRequest("hello"), max_new_tokens=3, ignore_eos=True))) >= 3


def test_client_unreachable_server_names_the_url():
    with pytest.raises(ServerError, match="cannot reach the server at http://127.0.0.1:9"):
        ServerClient("http://127.0.0.1:9", timeout=5).models()


# ---------------------------------------------------------------------------------------------- CLI
def test_mono_chat_against_a_server_equals_the_folder(server, model_dir, capsys):
    url, _ = server
    image = model_dir / "red.png"
    assert cli.main(["chat", str(model_dir), "--image", str(image), "what is in the image",
                     "--max-new-tokens", "5"]) == 0
    local = capsys.readouterr().out
    assert local.strip(), "the tiny model answered nothing: the comparison would not bite"
    assert cli.main(["chat", url, "--image", str(image), "what is in the image", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == local


def test_mono_chat_server_down_is_an_error(capsys):
    assert cli.main(["chat", "http://127.0.0.1:9", "hello"]) == 1
    assert "cannot reach the server at http://127.0.0.1:9" in capsys.readouterr().err


def test_mono_serve_dry_run_own(model_dir, capsys):
    assert cli.main(["serve", str(model_dir), "--engine", "own", "--port", "8000", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["engine"] == "own" and plan["port"] == 8000 and plan["dtype"] in ("float32", "bfloat16")
    assert plan["model_name"] == model_dir.name


def test_mono_serve_refuses_a_folder_that_is_not_mono(tmp_path, model_dir, capsys):
    folder = tmp_path / "llama"
    folder.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((model_dir / name).read_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    config["llm_config"]["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        cli.main(["serve", str(folder), "--engine", "own", "--dry-run"])
    err = capsys.readouterr().err
    assert "not a Mono-InternVL folder" in err and "mono export" in err


def test_mono_bench_serve_own_engine_writes_json(model_dir, tmp_path, capsys):
    assert cli.main(["bench-serve", str(model_dir), "--engines", "own,lmdeploy", "--requests", "2",
                     "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("serve_*.json")
    record = json.loads(path.read_text())
    own = record["results"]["own"]
    assert own["status"] == "ok" and own["summary"]["requests"] == 2
    assert all(s["output_tokens"] == 4 and s["ttft_s"] > 0 for s in own["samples"])
    assert own["summary"]["output_tok_s"] > 0 and own["summary"]["decode_tok_s_mean"] > 0
    if not torch.cuda.is_available():
        assert record["results"]["lmdeploy"] == {"status": "skipped",
                                                 "reason": "LMDeploy's PyTorch engine needs a CUDA GPU"}
    assert record["git"]["sha"] and record["environment"]["torch"] == torch.__version__
    assert "TTFT mean ms" in capsys.readouterr().out


def test_mono_bench_serve_over_http(server, tmp_path):
    url, _ = server
    assert cli.main(["bench-serve", "--url", url, "--requests", "2", "--warmup", "0", "--max-new-tokens", "3",
                     "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("serve_server_*.json")
    result = json.loads(path.read_text())["results"]["server"]
    assert result["status"] == "ok" and [s["output_tokens"] for s in result["samples"]] == [3, 3]
