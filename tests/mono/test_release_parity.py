"""Our model against outputs the released Mono-InternVL code produced for the same tiny checkpoint."""

import pytest
import torch
from transformers import AutoModel

from mono import MonoInternVL

TOL = 1e-4  # the release itself meets this against a re-run (tests/assets/release_tiny/README.md)


@pytest.fixture(scope="module")
def release_model(release_ckpt):
    return MonoInternVL.from_pretrained(release_ckpt).eval()


def test_text_prefill_logits(release_model, release_ref):
    with torch.no_grad():
        out = release_model(input_ids=release_ref["a_text__input_ids"], attention_mask=release_ref["a_text__attention_mask"])
    diff = (out.logits - release_ref["a_text__logits"]).abs().max().item()
    assert diff <= TOL, diff


def test_image_prefill_logits(release_model, release_ref):
    with torch.no_grad():
        out = release_model(
            pixel_values=release_ref["b_image__pixel_values"],
            input_ids=release_ref["b_image__input_ids"],
            attention_mask=release_ref["b_image__attention_mask"],
            image_flags=release_ref["b_image__image_flags"],
        )
    diff = (out.logits - release_ref["b_image__logits"]).abs().max().item()
    assert diff <= TOL, diff
    assert int(out.visual_token_mask.sum()) == 12


def test_greedy_generation_tokens(release_model, release_ref):
    tokens = release_model.generate(
        pixel_values=release_ref["d_generate__pixel_values"],
        input_ids=release_ref["d_generate__input_ids"],
        attention_mask=release_ref["d_generate__attention_mask"],
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
    )
    assert tokens.tolist() == release_ref["d_generate__tokens"].tolist()


def test_automodel_loads_release_folder(release_ckpt, release_ref, auto_classes):
    model = AutoModel.from_pretrained(release_ckpt).eval()
    assert isinstance(model, MonoInternVL)
    with torch.no_grad():
        out = model(input_ids=release_ref["a_text__input_ids"])
    assert (out.logits - release_ref["a_text__logits"]).abs().max().item() <= TOL


def test_bf16_image_prefill_tracks_fp32(release_ckpt, release_ref):
    model = MonoInternVL.from_pretrained(release_ckpt, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        out = model(
            pixel_values=release_ref["b_image__pixel_values"].bfloat16(),
            input_ids=release_ref["b_image__input_ids"],
            image_flags=release_ref["b_image__image_flags"],
        )
    ref = release_ref["b_image__logits"]
    assert torch.isfinite(out.logits).all()
    rel = (out.logits - ref).norm() / ref.norm()
    assert rel < 0.05, rel


@pytest.mark.interpret
def test_triton_backend_reproduces_release_and_torch_grads(release_ckpt, release_ref, monkeypatch):
    """The whole model on the Triton kernels (interpreter, fp32): release logits, and the same gradients of
    every routed-FFN weight as the torch backend (visual experts trainable, text experts frozen, as in S1.1)."""
    inputs = dict(
        pixel_values=release_ref["b_image__pixel_values"],
        input_ids=release_ref["b_image__input_ids"],
        attention_mask=release_ref["b_image__attention_mask"],
        image_flags=release_ref["b_image__image_flags"],
    )
    grads = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("MONO_MOE_BACKEND", backend)
        model = MonoInternVL.from_pretrained(release_ckpt).train(False)
        for name, p in model.named_parameters():
            p.requires_grad_("feed_forward_ve" in name or "mlp1" in name)
        out = model(**inputs)
        if backend == "triton":
            diff = (out.logits.detach() - release_ref["b_image__logits"]).abs().max().item()
            assert diff <= TOL, diff
        out.logits.float().logsumexp(-1).sum().backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["triton"].keys() == grads["torch"].keys() and grads["torch"]
    for name, ref in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][name], ref, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
