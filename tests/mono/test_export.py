"""``mono export``: the release-layout folder, its remote code in a clean environment, sources, sharding, CLI."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import kernels
from mono import MonoInternVL, MonoInternVLConfig
from mono.checkpoint import expected_shapes, validate_checkpoint
from mono.deploy import export as ex
from mono.deploy import remote_code as rc
from mono.processing import load_image

from .conftest import tiny_chat_model

RELEASE_TOL = 1e-4  # what the release meets against a re-run (tests/assets/release_tiny/README.md)
QUESTION = "what is in the image"


def _export(source, out, **kwargs):
    kwargs.setdefault("progress", False)
    return ex.export(source, out, **kwargs)


def _shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("model-*.safetensors"))


@pytest.fixture(scope="module")
def chat_src(tmp_path_factory):
    """A tiny model + tokenizer saved as a checkpoint folder, and an image."""
    folder = tmp_path_factory.mktemp("chat_src")
    torch.manual_seed(0)
    model, tok = tiny_chat_model()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    image = folder.parent / f"{folder.name}-red.png"
    Image.new("RGB", (120, 60), (200, 30, 30)).save(image)
    return folder, model, tok, image


@pytest.fixture(scope="module")
def exports(chat_src, tmp_path_factory):
    """The tiny checkpoint exported twice: float32 in small shards, and bfloat16 with the default shard size."""
    folder = tmp_path_factory.mktemp("exports")
    fp32 = _export(chat_src[0], folder / "fp32", dtype="float32", max_shard_size="60KB")
    bf16 = _export(chat_src[0], folder / "bf16")
    return {"fp32": fp32, "bf16": bf16}


# ============================================================================================== layout
def test_config_exposes_auto_map():
    # transformers' AutoModel looks for remote code in the attribute `config.auto_map`; our config class must
    # expose the key it reads from config.json, or no exported folder loads with trust_remote_code.
    config = MonoInternVLConfig(auto_map=dict(rc.AUTO_MAP))
    assert getattr(config, "auto_map", None) == rc.AUTO_MAP
    assert config.to_dict()["auto_map"] == rc.AUTO_MAP


def test_release_layout(exports, chat_src):
    _, model, tok, _ = chat_src
    for dtype, folder in (("float32", exports["fp32"]), ("bfloat16", exports["bf16"])):
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["architectures"] == ["InternVLChatModel"] and cfg["model_type"] == "internvl_chat"
        assert cfg["llm_config"]["architectures"] == ["InternLM2VEForCausalLM"]
        assert cfg["auto_map"] == rc.AUTO_MAP
        assert cfg["torch_dtype"] == cfg["llm_config"]["torch_dtype"] == cfg["vision_config"]["torch_dtype"] == dtype
        assert cfg["img_context_token_id"] == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
        gen = json.loads((folder / "generation_config.json").read_text())
        assert gen["eos_token_id"][0] == tok.eos_token_id
        assert sorted(gen["eos_token_id"]) == sorted(model._stop_ids(tok))  # </s>, <|im_end|>, <|im_start|>
        assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
        # The model's own prompt format as the tokenizer's chat template (LMDeploy's default template uses it).
        tok_config = json.loads((folder / "tokenizer_config.json").read_text())
        assert tok_config["chat_template"] == model._template().to_jinja()
        assert not (folder / "chat_template.jinja").exists()
        assert not (folder / "model.safetensors").exists()  # always the index form
        for ref in rc.AUTO_MAP.values():
            assert (folder / f"{ref.split('.')[0]}.py").is_file()
        validate_checkpoint(str(folder), MonoInternVLConfig.from_pretrained(folder))
        umask = os.umask(0)
        os.umask(umask)
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    assert _shard_names(exports["bf16"]) == ["model-00001-of-00001.safetensors"]
    with safe_open(str(exports["bf16"] / "model-00001-of-00001.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_sharding_index_covers_every_tensor_once(exports, chat_src):
    folder = exports["fp32"]
    shards = _shard_names(folder)
    assert len(shards) > 2
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    index = json.loads((folder / ex.INDEX_FILE).read_text())
    expected = expected_shapes(chat_src[1].config)
    assert set(index["weight_map"]) == set(expected)
    seen: dict[str, str] = {}
    total = 0
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as f:
            shard_bytes = 0
            for key in f.keys():
                assert key not in seen, f"{key} in {seen[key]} and {shard}"
                seen[key] = shard
                t = f.get_tensor(key)
                shard_bytes += t.numel() * t.element_size()
                assert tuple(t.shape) == expected[key]
            # 60 KB shards; only a single tensor larger than that may exceed it (the vocab-sized ones here do not).
            assert shard_bytes <= 60_000 or len(list(f.keys())) == 1
            total += shard_bytes
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    # the weights are the source's, bit for bit (float32 export of a float32 model)
    state = chat_src[1].state_dict()
    for key, shard in seen.items():
        with safe_open(str(folder / shard), framework="pt") as f:
            assert torch.equal(f.get_tensor(key), state[key]), key


def test_plan_shards_and_sizes():
    assert ex.plan_shards([("a", 4), ("b", 4), ("c", 10), ("d", 1)], 8) == [["a", "b"], ["c"], ["d"]]
    assert ex.parse_size("2GB") == 2 * 10**9 and ex.parse_size("1GiB") == 2**30 and ex.parse_size(123) == 123
    assert ex.parse_size("1.5 MB") == 1_500_000
    for bad in ("lots", "0MB", -1, "2 GBs"):
        with pytest.raises(ValueError, match="size"):
            ex.parse_size(bad)


# ============================================================================================== clean environment
# The child runs where this project's packages are not importable (the repo is pip-installed in editable mode).
CHILD = r"""
import importlib.util, json, sys

# Drop the editable install's import hooks, then refuse this project's packages outright.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]


class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("mono", "evip", "benchmarks"):
            raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)", name=name)
        return None


sys.meta_path.insert(0, _Refuse())
for name in ("mono", "evip"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable in the clean child")
# `kernels` is not refused by raising: transformers probes importlib.util.find_spec("kernels") for the Hugging
# Face `kernels` package, and a finder raising there breaks model loading. Without the hooks it must be absent.
assert importlib.util.find_spec("kernels") is None, importlib.util.find_spec("kernels")

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.dynamic_module_utils import get_class_from_dynamic_module

spec = json.loads(sys.argv[1])
inputs = torch.load(spec["inputs"], weights_only=True)
results, info = {}, {}
for tag, folder in spec["folders"].items():
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    info[f"{tag}_class"] = f"{type(model).__module__}.{type(model).__name__}"
    with torch.no_grad():
        results[f"{tag}_text"] = model(input_ids=inputs["text_ids"]).logits
        results[f"{tag}_image"] = model(input_ids=inputs["image_ids"], pixel_values=inputs["pixel_values"]).logits
    if tag == "fp32":
        chat_model = model
folder = spec["folders"]["fp32"]
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
plain = AutoTokenizer.from_pretrained(folder)  # no trust flag: transformers falls back to a plain config
info["vocab"] = tok.get_vocab()
info["plain_vocab_equal"] = plain.get_vocab() == info["vocab"]
load_image = get_class_from_dynamic_module("image_processing_mono_internvl.load_image", folder)
pixel_values = load_image(spec["image"], image_size=spec["image_size"], max_num=spec["max_num"])
results["pixel_values"] = pixel_values
info["answer"] = chat_model.chat(tok, pixel_values, spec["question"], dict(max_new_tokens=4, do_sample=False))
info["foreign_modules"] = sorted(m for m in sys.modules if m.partition(".")[0] in ("mono", "kernels", "evip"))
info["lmdeploy_imported"] = "lmdeploy" in sys.modules  # the folder's LMDeploy hook must not import it
turns = [{"role": role, "content": text} for role, text in (("user", "hi"), ("assistant", "hello"), ("user", "and?"))]
info["chat_template"] = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
torch.save(results, spec["out"])
with open(spec["info"], "w") as f:
    json.dump(info, f)
"""


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
    )
    return env


def test_remote_code_loads_without_this_package(exports, chat_src, tmp_path):
    folder, model, tok, image = chat_src
    config = model.config
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    text_ids = tok("<|im_start|>user\nhello world how are you<|im_end|>", return_tensors="pt").input_ids
    tiles = 2
    image_ids = torch.cat(
        [text_ids[:, :3], torch.tensor([[tok.convert_tokens_to_ids("<img>")] + [ctx] * (tiles * config.tokens_per_tile)
                                         + [tok.convert_tokens_to_ids("</img>")]]), text_ids[:, 3:]], dim=1
    )
    pixel_values = torch.randn(tiles, 3, config.image_size, config.image_size)
    inputs = {"text_ids": text_ids, "image_ids": image_ids, "pixel_values": pixel_values}
    torch.save(inputs, tmp_path / "inputs.pt")
    spec = {
        "folders": {k: str(v) for k, v in exports.items()}, "inputs": str(tmp_path / "inputs.pt"),
        "out": str(tmp_path / "out.pt"), "info": str(tmp_path / "info.json"), "image": str(image),
        "image_size": config.image_size, "max_num": config.max_dynamic_patch, "question": QUESTION,
    }
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)], cwd=tmp_path, env=_clean_env(tmp_path),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["foreign_modules"] == []
    assert info["lmdeploy_imported"] is False
    assert info["chat_template"] == model._template().render([("user", "hi"), ("assistant", "hello"), ("user", "and?")])
    assert info["fp32_class"].startswith("transformers_modules.") and info["fp32_class"].endswith(".MonoInternVL")

    model.config.img_context_token_id = ctx
    # The float32 export holds the source's weights bit for bit, so the remote code must give the same logits.
    # The bf16 export holds them rounded to bf16; loaded as float32 it must equal the source model with its
    # weights rounded the same way, computed in float32: an exact comparison, not a loose bf16 tolerance.
    rounded = MonoInternVL(model.config).eval()
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    rounded.config.img_context_token_id = ctx
    for tag, ref_model in (("fp32", model), ("bf16", rounded)):
        with torch.no_grad():
            ref_text = ref_model(input_ids=text_ids).logits
            ref_image = ref_model(input_ids=image_ids, pixel_values=pixel_values).logits
        torch.testing.assert_close(got[f"{tag}_text"], ref_text, rtol=0, atol=1e-6)
        torch.testing.assert_close(got[f"{tag}_image"], ref_image, rtol=0, atol=1e-6)
    assert not torch.equal(got["fp32_image"], got["bf16_image"])  # the bf16 export really is rounded

    assert info["vocab"] == tok.get_vocab() and info["plain_vocab_equal"]
    pv = load_image(image, image_size=config.image_size, max_num=config.max_dynamic_patch)
    assert torch.equal(got["pixel_values"], pv)
    answer = model.chat(tok, pv, QUESTION, dict(max_new_tokens=4, do_sample=False))
    assert info["answer"] == answer


# ============================================================================================== release fixture
def test_release_fixture_export_reproduces_reference_logits(release_ckpt, release_ref, tmp_path, capsys):
    out = _export(release_ckpt, tmp_path / "release", dtype="float32")
    err = capsys.readouterr().err
    assert "no tokenizer" in err  # the fixture has none; the export says so
    assert (out / "added_tokens.json").is_file()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 97, 96]  # </s>, <|im_end|>, <|im_start|> (ids from added_tokens.json)
    model = MonoInternVL.from_pretrained(out).eval()
    with torch.no_grad():
        text = model(input_ids=release_ref["a_text__input_ids"], attention_mask=release_ref["a_text__attention_mask"])
        image = model(
            pixel_values=release_ref["b_image__pixel_values"], input_ids=release_ref["b_image__input_ids"],
            attention_mask=release_ref["b_image__attention_mask"], image_flags=release_ref["b_image__image_flags"],
        )
    assert (text.logits - release_ref["a_text__logits"]).abs().max().item() <= RELEASE_TOL
    assert (image.logits - release_ref["b_image__logits"]).abs().max().item() <= RELEASE_TOL


# ============================================================================================== sources
def _fake_stage(run: Path, stage: str, *, export: bool = True, checkpoints: bool = False) -> Path:
    (run / stage).mkdir(parents=True)
    if export:
        (run / stage / "export").mkdir()
        (run / stage / "export" / "config.json").write_text("{}")
    if checkpoints:
        (run / stage / "checkpoints" / "step-00000010").mkdir(parents=True)
    return run / stage


def test_run_folder_resolves_to_last_stage(tmp_path):
    run = tmp_path / "run"
    for stage in ("s1.1", "s1.3", "s1.2"):
        _fake_stage(run, stage)
    assert ex.resolve_source(run) == run / "s1.3" / "export"
    _fake_stage(run, "s2")
    assert ex.resolve_source(run) == run / "s2" / "export"
    assert ex.resolve_source(run / "s1.2") == run / "s1.2" / "export"
    assert ex.resolve_source(run / "s1.2" / "export") == run / "s1.2" / "export"


def test_run_folder_export_end_to_end(chat_src, tmp_path, capsys):
    run = tmp_path / "run"
    _fake_stage(run, "s1.1")
    (run / "s2").mkdir()
    shutil.copytree(chat_src[0], run / "s2" / "export")
    out = _export(run, tmp_path / "out", progress=True)
    assert "export 1 shard(s)" in capsys.readouterr().err  # the progress bar
    validate_checkpoint(str(out), MonoInternVLConfig.from_pretrained(out))


def test_stage_with_only_checkpoints_says_how_to_export(tmp_path):
    run = tmp_path / "run"
    _fake_stage(run, "s1.3")
    stage = _fake_stage(run, "s2", export=False, checkpoints=True)
    for source in (run, stage):
        with pytest.raises(ex.SourceError) as err:
            ex.resolve_source(source)
        message = str(err.value)
        assert str(stage) in message and "no export/" in message and "step-00000010" in message
        assert "evip train" in message


def test_bad_sources_name_the_path(tmp_path):
    with pytest.raises(ex.SourceError, match="does not exist"):
        ex.resolve_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ex.SourceError, match=r"empty.*no config\.json"):
        ex.resolve_source(tmp_path / "empty")
    (tmp_path / "file.safetensors").write_bytes(b"")
    with pytest.raises(ex.SourceError, match="is a file"):
        ex.resolve_source(tmp_path / "file.safetensors")


# ============================================================================================== output folder
def test_non_empty_out_dir_needs_force(chat_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ex.ExportError, match="not empty"):
        _export(chat_src[0], out)
    assert (out / "old.txt").read_text() == "old"
    _export(chat_src[0], out, force=True)
    assert not (out / "old.txt").exists() and (out / ex.INDEX_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folder left beside it
    empty = tmp_path / "empty"
    empty.mkdir()
    _export(chat_src[0], empty)  # an existing empty folder is fine without force


def test_out_dir_may_not_replace_the_source(chat_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(chat_src[0], src)
    for out in (src, tmp_path):
        with pytest.raises(ex.ExportError, match="would replace the source"):
            _export(src, out, force=True)


def test_failed_export_leaves_nothing_behind(chat_src, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(rc, "write_remote_code", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        _export(chat_src[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "a.txt").write_text("a")
    with pytest.raises(RuntimeError, match="disk full"):
        _export(chat_src[0], tmp_path / "kept", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["a.txt"]  # the old folder is untouched


def test_dtypes_and_tokenizer_option(chat_src, tmp_path, capsys):
    folder, model, tok, _ = chat_src
    with pytest.raises(ValueError, match="dtype"):
        _export(folder, tmp_path / "x", dtype="int8")
    weights_only = tmp_path / "weights_only"
    model.save_pretrained(weights_only)
    out = _export(weights_only, tmp_path / "fp16", dtype="float16", tokenizer=folder)
    assert "LMDeploy refuses fp16" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert (out / "tokenizer.json").is_file()
    with pytest.raises(ex.ExportError, match="not a folder"):
        _export(weights_only, tmp_path / "y", tokenizer=tmp_path / "missing")
    with pytest.raises(ex.ExportError, match="holds no tokenizer"):
        _export(weights_only, tmp_path / "z", tokenizer=weights_only)
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


# ============================================================================================== bundler
def test_bundle_is_deterministic_and_self_contained():
    files = rc.bundle_sources()
    assert files == rc.bundle_sources()
    assert set(files) == {f"{m}.py" for m in rc.MONO_MODULES.values()} | {f"{rc.KERNELS_MODULE}.py"}
    for name, text in files.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                assert not {a.name.partition(".")[0] for a in node.names} & {"mono", "kernels", "evip"}, name
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.partition(".")[0] not in ("mono", "kernels", "evip"), name


def test_bundler_fails_loudly_on_unknown_imports(tmp_path):
    fake = textwrap.dedent(
        """
        from .configuration import MonoInternVLConfig

        def helper():
            import yaml
            return yaml

        try:
            import flash_attn  # optional: transformers skips imports inside try blocks, and so do we
        except ImportError:
            flash_attn = None
        """
    )
    with pytest.raises(rc.RemoteCodeError, match=r"mono/fake\.py:5: imports 'yaml'"):
        rc.rewrite_module(fake, "mono/fake.py")
    for line, message in (
        ("from .demo import main", r"imports mono/demo\.py, which the remote-code bundler does not know"),
        ("import evip.train", "use relative imports"),
        ("from mono.configuration import MonoInternVLConfig", "use relative imports"),
        ("from ..kernels import moe_ffn", "reaches outside mono/"),
        ("from kernels import select_backend", "provides only"),
        ("import kernels\nkernels.select_backend('cpu')", r"kernels\.select_backend"),
    ):
        with pytest.raises(rc.RemoteCodeError, match=message):
            rc.rewrite_module(line + "\n", "mono/fake.py")
    text, deps = rc.rewrite_module(fake.replace("import yaml", "import json"), "mono/fake.py")
    assert deps == ["configuration"] and "from .configuration_mono_internvl import MonoInternVLConfig" in text
    # A module in a subpackage: relative imports resolve against its package; LMDeploy only under deploy/lmdeploy.
    sub = "from ...configuration import MonoInternVLConfig\nfrom .mapping import split_wqkv\nimport lmdeploy\n"
    text, deps = rc.rewrite_module(sub, "mono/deploy/lmdeploy/fake.py", module="deploy.lmdeploy.fake")
    assert deps == ["configuration", "deploy.lmdeploy.mapping"]
    assert "from .configuration_mono_internvl import MonoInternVLConfig" in text
    assert "from .lmdeploy_mapping_mono_internvl import split_wqkv" in text
    with pytest.raises(rc.RemoteCodeError, match="reaches outside mono/"):
        rc.rewrite_module("from ....kernels import moe_ffn\n", "mono/deploy/lmdeploy/fake.py",
                          module="deploy.lmdeploy.fake")
    with pytest.raises(rc.RemoteCodeError, match="imports 'lmdeploy'"):
        rc.rewrite_module("import lmdeploy\n", "mono/fake.py")
    # A source folder whose module gains an unknown import breaks the whole bundle.
    mono_dir = tmp_path / "mono"
    shutil.copytree(rc.MONO_DIR, mono_dir, ignore=shutil.ignore_patterns("__pycache__"))
    vision = mono_dir / "vision.py"
    vision.write_text(vision.read_text() + "\n\ndef _later():\n    import einops\n    return einops\n")
    with pytest.raises(rc.RemoteCodeError, match=r"mono/vision\.py:\d+: imports 'einops'"):
        rc.bundle_sources(mono_dir)


def test_generated_kernels_match_the_package(tmp_path, monkeypatch):
    path = tmp_path / f"{rc.KERNELS_MODULE}.py"
    path.write_text(rc.kernels_module_source())
    spec = importlib.util.spec_from_file_location("mono_kernels_under_test", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    for name in ("moe_ffn", "routed_linear", "build_routing"):
        assert inspect.signature(getattr(module, name)) == inspect.signature(getattr(kernels, name)), name
    assert [f.name for f in module.Routing.__dataclass_fields__.values()] == list(kernels.Routing.__dataclass_fields__)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 16, generator=g)
    ids = torch.tensor([0, 1, 1, 0, 0, 1, 0])
    w1, w3 = [torch.randn(24, 16, generator=g) for _ in range(2)], [torch.randn(24, 16, generator=g) for _ in range(2)]
    w2 = [torch.randn(16, 24, generator=g) for _ in range(2)]
    ours = module.moe_ffn(x, module.build_routing(ids, 2), w1, w3, w2)
    ref = kernels.moe_ffn(x, kernels.build_routing(ids, 2), w1, w3, w2, backend="torch")
    assert torch.equal(ours, ref)
    assert torch.equal(module.routed_linear(x, module.build_routing(ids, 2), w1), kernels.routed_linear(
        x, kernels.build_routing(ids, 2), w1))
    with pytest.raises(ValueError, match="only the torch backend"):
        module.moe_ffn(x, module.build_routing(ids, 2), w1, w3, w2, backend="triton")


# ============================================================================================== CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mono export")
    ex.add_export_arguments(parser)
    return parser


def test_cli_exports_and_prints_the_load_hint(chat_src, tmp_path, capsys):
    parser = _parser()
    out = tmp_path / "cli_out"
    args = parser.parse_args([str(chat_src[0]), str(out), "--max-shard-size", "100KB", "--no-progress"])
    assert args.dtype == "bfloat16" and args.progress is False
    assert ex.run_export(args, parser) == 0
    printed = capsys.readouterr().out
    shards = len(_shard_names(out))
    assert str(out) in printed and f"{shards} shard(s)" in printed and "bfloat16" in printed
    assert f"AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True)" in printed
    assert f"mono serve {out}" in printed and f"lmdeploy serve api_server {out}" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{tmp}/missing", "{tmp}/o"], "missing does not exist"),
        (["{src}", "{tmp}/o", "--max-shard-size", "huge"], "--max-shard-size"),
        (["{src}", "{tmp}/o", "--tokenizer", "{tmp}/nope"], "--tokenizer"),
        (["{src}", "{tmp}/full"], "full is not empty"),
    ],
)
def test_cli_usage_errors_name_the_path(chat_src, tmp_path, capsys, argv, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    parser = _parser()
    args = parser.parse_args([a.format(tmp=tmp_path, src=chat_src[0]) for a in argv])
    with pytest.raises(SystemExit) as exc:
        ex.run_export(args, parser)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
