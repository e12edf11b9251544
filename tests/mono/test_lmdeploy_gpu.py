"""CUDA: LMDeploy's PyTorch engine, through ``mono.deploy.lmdeploy.pipeline``, decodes greedily what this project's
own ``MonoInternVL.generate`` decodes, text-only and with an image, on a small trained checkpoint and on a
2B-sized random one (the release's sizes, bf16).

The two engines run different bf16 kernels (fused RMSNorm + residual, paged attention), so on a random model,
whose logits are nearly flat, greedy decoding may split at a near tie; there the first differing token must be a
near tie in our own logits. The trained checkpoint must agree exactly up to its first stop token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")]

if not torch.cuda.is_available():
    pytest.skip("needs CUDA (LMDeploy's PyTorch engine)", allow_module_level=True)
INSTALL = "install LMDeploy with its CUDA dependencies (`pip install lmdeploy`) or scripts/install_lmdeploy.sh"
_PIL_TRUNCATED = ImageFile.LOAD_TRUNCATED_IMAGES  # `import lmdeploy` sets it process-wide; restored below
try:
    import lmdeploy  # noqa: F401
except ImportError as err:
    if os.environ.get("CI") == "true":
        pytest.fail(f"LMDeploy is not installed ({err}): {INSTALL}", pytrace=False)
    pytest.skip(f"LMDeploy is not installed ({err}): {INSTALL}", allow_module_level=True)
ImageFile.LOAD_TRUNCATED_IMAGES = _PIL_TRUNCATED

from mono import MonoInternVL, MonoInternVLConfig  # noqa: E402
from mono.deploy import lmdeploy as mld  # noqa: E402
from mono.processing import load_image  # noqa: E402
from mono.tokenization import add_special_tokens  # noqa: E402

from .conftest import WORDS, tiny_chat_model  # noqa: E402
from .test_lmdeploy import _BLOCK_OWN_PACKAGES, needs_config_fix  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO_EXPORT = ROOT / ".cache" / "demo" / "runs" / "evip" / "s2" / "export"
MAX_NEW_TOKENS = 16
NEAR_TIE = 0.02  # relative logit gap counted as a tie between bf16 engines
IMAGE_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>")


@pytest.fixture(autouse=True)
def _keep_pil_truncated_flag():
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = _PIL_TRUNCATED


def deployable_folder(model: MonoInternVL, tokenizer, out_dir: Path) -> Path:
    """The folder LMDeploy serves: bf16 weights, config, generation config and tokenizer.

    Written by ``mono export`` (the release layout with remote code: what users deploy), in bfloat16.
    """
    from mono.deploy.export import export

    src = out_dir.parent / (out_dir.name + "-src")
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    export(src, out_dir, dtype="bfloat16", force=True, progress=False)
    return out_dir


def _square_image(size: int) -> Image.Image:
    """One tile exactly: both engines resize it to itself (a copy) and normalise it the same way."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def _own_greedy(model: MonoInternVL, tokenizer, question: str, image: Image.Image | None):
    """This project's greedy decoding of the chat prompt, exactly ``MAX_NEW_TOKENS`` tokens (no early stop)."""
    model._bind_tokenizer(tokenizer, IMAGE_TOKENS[2])
    config = model.config
    pixel_values, tiles = None, []
    if image is not None:
        pixel_values = load_image(image, image_size=config.image_size, max_num=config.max_dynamic_patch,
                                  use_thumbnail=config.use_thumbnail).to("cuda", torch.bfloat16)
        tiles = [pixel_values.shape[0]]
    prompt = model._render([], "<image>\n" * bool(tiles) + question, tiles, IMAGE_TOKENS)
    inputs = model._tokenize_prompts(tokenizer, [prompt])
    out = model.generate(pixel_values=pixel_values, **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                         eos_token_id=None)
    return out[0].tolist(), inputs, pixel_values


def _lmdeploy_greedy(folder: Path, requests: list[tuple[str, Image.Image | None]]) -> list[list[int]]:
    from lmdeploy import GenerationConfig

    gen = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, top_k=1, ignore_eos=True)
    backend = mld.engine_config(cache_max_entry_count=0.2, session_len=4096)
    out = []
    with mld.pipeline(folder, backend_config=backend) as pipe:
        for question, image in requests:
            # (image, question): LMDeploy puts the image before the text, as chat()'s "<image>\n" prefix does.
            response = pipe((image, question) if image is not None else question, gen_config=gen)
            out.append(list(response.token_ids))
    return out


_PLAIN_PIPELINE = """
import json, sys
from PIL import Image
from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline

spec = json.loads(sys.argv[1])
gen = GenerationConfig(max_new_tokens=spec["max_new_tokens"], do_sample=False, top_k=1, ignore_eos=True)
backend = PytorchEngineConfig(dtype="bfloat16", cache_max_entry_count=0.2, session_len=4096)
out = []
with pipeline(spec["folder"], backend_config=backend, trust_remote_code=True) as pipe:
    for question, image in spec["requests"]:
        response = pipe((Image.open(image).convert("RGB"), question) if image else question, gen_config=gen)
        out.append(list(response.token_ids))
print(json.dumps(out))
"""


def _plain_lmdeploy_greedy(folder: Path, requests: list[tuple[str, Image.Image | None]]) -> list[list[int]]:
    """LMDeploy's own ``pipeline(folder, trust_remote_code=True)`` in a process where this package cannot be
    imported: the folder registers its bundled LMDeploy model itself, and LMDeploy's default chat template is the
    folder's ``chat_template``."""
    specs = []
    for k, (question, image) in enumerate(requests):
        path = None
        if image is not None:
            path = str(folder.parent / f"request{k}.png")
            image.save(path)
        specs.append((question, path))
    spec = {"folder": str(folder), "requests": specs, "max_new_tokens": MAX_NEW_TOKENS}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _BLOCK_OWN_PACKAGES + textwrap.dedent(_PLAIN_PIPELINE),
                           json.dumps(spec)], capture_output=True, text=True, cwd=folder.parent, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def _check_same(model, tokenizer, inputs, pixel_values, ours, theirs, exact: bool, label: str) -> None:
    stops = set(model._stop_ids(tokenizer))
    ours, theirs = _until_stop(ours, stops), _until_stop(theirs, stops)
    if ours == theirs or (len(theirs) == len(ours) - 1 and ours[:-1] == theirs and ours[-1] in stops):
        return  # equal (LMDeploy may leave the stop token out of token_ids)
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    assert not exact, f"{label}: greedy outputs differ at new token {i}: ours {ours} vs LMDeploy {theirs}"
    assert i < len(ours) and i < len(theirs), f"{label}: one output stops early: ours {ours} vs LMDeploy {theirs}"
    prefix = torch.tensor([ours[:i]], device=inputs["input_ids"].device, dtype=inputs["input_ids"].dtype)
    ids = torch.cat([inputs["input_ids"], prefix], dim=1)
    logits = model(pixel_values=pixel_values, input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
    gap = (logits[ours[i]] - logits[theirs[i]]).item()
    assert gap <= NEAR_TIE * max(1.0, logits.abs().max().item()), (
        f"{label}: LMDeploy chose token {theirs[i]} at step {i} where ours chose {ours[i]}, {gap:.4f} logits "
        f"ahead: not a near tie; ours {ours} vs LMDeploy {theirs}")


def _compare(model, tokenizer, folder, questions, image, exact: bool, route: str = "mono") -> None:
    requests = [(q, None) for q in questions] + [(questions[0], image)]
    own = [_own_greedy(model, tokenizer, q, img) for q, img in requests]
    theirs = (_lmdeploy_greedy if route == "mono" else _plain_lmdeploy_greedy)(folder, requests)
    for (q, img), (ours, inputs, pixel_values), lmd in zip(requests, own, theirs):
        label = f"{'image + ' if img is not None else ''}{q!r}"
        _check_same(model, tokenizer, inputs, pixel_values, ours, lmd, exact, label)


@needs_config_fix
@pytest.mark.parametrize("route", ["mono", "plain"])
def test_trained_checkpoint_greedy_equals_ours(tmp_path, route):
    """The EViP demo's final checkpoint when present (exact agreement), else a tiny random one (near ties).

    ``mono``: ``mld.pipeline`` (this package's registration); ``plain``: LMDeploy's own ``pipeline`` with
    ``trust_remote_code=True`` where this package is not importable (the folder's self-registration)."""
    mld.register()
    if (DEMO_EXPORT / "config.json").is_file():
        from transformers import AutoTokenizer

        model = MonoInternVL.from_pretrained(DEMO_EXPORT)
        tokenizer = AutoTokenizer.from_pretrained(DEMO_EXPORT)
        questions, exact = ["What digit is this?", "Hello, who are you?"], True
    else:
        torch.manual_seed(0)
        model, tokenizer = tiny_chat_model()
        questions, exact = ["what is in the image", "hello how are you"], False
    folder = deployable_folder(model, tokenizer, tmp_path / "model")
    model = model.to("cuda", torch.bfloat16).eval()
    _compare(model, tokenizer, folder, questions, _square_image(model.config.image_size), exact, route)


def _release_sized_tokenizer():
    """A word-level tokenizer with the InternLM2 id layout: 92544 base ids (``<|im_start|>`` 92542,
    ``<|im_end|>`` 92543) plus the nine special tokens (``<IMG_CONTEXT>`` 92546): vocabulary 92553."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    words = [w for w in WORDS + ["\n", "system", "user", "assistant"] if w not in specials]
    filler = [f"t{i}" for i in range(92542 - len(specials) - len(words))]
    vocab = {t: i for i, t in enumerate(specials + words + filler + ["<|im_start|>", "<|im_end|>"])}
    assert len(vocab) == 92544
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    add_special_tokens(fast)
    assert len(fast) == 92553 and fast.convert_tokens_to_ids("<IMG_CONTEXT>") == 92546
    return fast


@needs_config_fix
def test_2b_random_greedy_equals_ours(tmp_path):
    """The release's sizes (hidden 2048, 24 layers, 16 heads, 8 kv heads, FFN 8192, vocab 92553, 448 px tiles)."""
    mld.register()
    config = MonoInternVLConfig(
        vision_config=dict(hidden_size=1024, image_size=448, patch_size=14),
        llm_config=dict(vocab_size=92553, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=32768,
                        rope_theta=1_000_000.0, rope_scaling={"type": "dynamic", "factor": 2.0}, pad_token_id=0),
        force_image_size=448, max_dynamic_patch=6,
    )
    tokenizer = _release_sized_tokenizer()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MonoInternVL(config).to(torch.bfloat16).eval()
    folder = deployable_folder(model, tokenizer, tmp_path / "model")
    _compare(model, tokenizer, folder, ["what is in the image", "hello how are you"], _square_image(448),
             exact=False)
