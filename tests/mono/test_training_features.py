"""Training-side features of the model: activation checkpointing recomputes layers without changing anything."""

from __future__ import annotations

import torch

from mono import MonoInternVL
from tests.mono.conftest import image_prompt, randomize_norms, tiny_config


def _loss_and_grads(model: MonoInternVL, ids: torch.Tensor, pixels: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(pixel_values=pixels, input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_identical_loss_and_gradients():
    torch.manual_seed(0)
    model = MonoInternVL(tiny_config()).train()
    randomize_norms(model)
    ids, pixels = image_prompt(2, 4), torch.randn(2, 3, 56, 56)
    loss, grads = _loss_and_grads(model, ids, pixels)
    model.language_model.model.gradient_checkpointing = True
    calls = []
    # a pre-hook: the recomputation stops early, once it has what the backward needs (no forward hook)
    handle = model.language_model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    loss_ckpt, grads_ckpt = _loss_and_grads(model, ids, pixels)
    handle.remove()
    assert len(calls) == 2  # the layer ran again in the backward pass
    assert torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ckpt[name], atol=1e-6, rtol=1e-5, msg=name)
    model.eval()  # never in eval mode: one forward, nothing kept for a recomputation
    calls.clear()
    handle = model.language_model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    model(pixel_values=pixels, input_ids=ids, labels=ids).loss.backward()
    handle.remove()
    assert len(calls) == 1
