"""Modality routing in the full model: each token runs exactly one expert, decode tokens are text."""

import pytest
import torch

from mono import MonoInternVL

from .conftest import IMG_CONTEXT_ID, image_prompt, randomize_norms, tiny_config


def _inputs(model, tiles=2):
    ids = image_prompt(tiles, model.num_image_token)
    return dict(pixel_values=torch.randn(tiles, 3, 56, 56), input_ids=ids)


def test_visual_expert_does_not_touch_text_only_logits(tiny_model):
    ids = torch.randint(3, 96, (2, 11))
    before = tiny_model(input_ids=ids).logits
    with torch.no_grad():
        for layer in tiny_model.language_model.model.layers:
            for w in (layer.feed_forward_ve.w1, layer.feed_forward_ve.w2, layer.feed_forward_ve.w3):
                w.weight.normal_()
    after = tiny_model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_visual_expert_changes_image_token_outputs(tiny_model):
    inputs = _inputs(tiny_model)
    before = tiny_model(**inputs).logits
    with torch.no_grad():
        tiny_model.language_model.model.layers[0].feed_forward_ve.w2.weight.mul_(3.0)
    after = tiny_model(**inputs).logits
    ctx = inputs["input_ids"][0] == IMG_CONTEXT_ID
    first_img = int(ctx.nonzero()[0])
    assert torch.equal(before[0, :first_img], after[0, :first_img])  # tokens before the image: untouched
    assert not torch.allclose(before[0, ctx], after[0, ctx])


def test_text_tokens_never_run_the_visual_expert():
    # A blended implementation (both experts on every token, mixed by a 0/1 mask) turns NaN weights into NaN
    # everywhere (NaN * 0 = NaN). Exact routing keeps every position before the image finite and unchanged.
    # One layer: with two, the NaN image rows would reach earlier queries through attention (0 * NaN in P @ V).
    tiny_model = MonoInternVL(tiny_config(num_hidden_layers=1)).eval()
    randomize_norms(tiny_model)
    inputs = _inputs(tiny_model)
    clean = tiny_model(**inputs).logits
    with torch.no_grad():
        for layer in tiny_model.language_model.model.layers:
            layer.feed_forward_ve.w1.weight.fill_(float("nan"))
    poisoned = tiny_model(**inputs).logits
    first_img = int((inputs["input_ids"][0] == IMG_CONTEXT_ID).nonzero()[0])
    assert torch.equal(clean[0, :first_img], poisoned[0, :first_img])
    assert torch.isnan(poisoned[0, first_img]).any()


def test_decode_tokens_take_the_text_expert(tiny_model):
    # Prefill with clean weights, then poison the visual experts: a decode step must give the same logits, since
    # generated tokens never run the visual expert (they only attend to the cached image keys and values).
    inputs = _inputs(tiny_model)
    step_ids = torch.tensor([[7]])
    cache = tiny_model(**inputs, use_cache=True).past_key_values
    clean = tiny_model(input_ids=step_ids, past_key_values=cache, use_cache=True).logits
    cache = tiny_model(**inputs, use_cache=True).past_key_values
    with torch.no_grad():
        for layer in tiny_model.language_model.model.layers:
            layer.feed_forward_ve.w1.weight.fill_(float("nan"))
    step = tiny_model(input_ids=step_ids, past_key_values=cache, use_cache=True)
    assert step.visual_token_mask is None
    assert torch.equal(step.logits, clean)


def test_model_passes_host_counts_so_layers_slice_without_sync(tiny_model, monkeypatch):
    import kernels

    seen = []
    real = kernels.build_routing

    def spy(ids, num_experts=2, *, counts_host=None):
        seen.append(counts_host)
        return real(ids, num_experts, counts_host=counts_host)

    monkeypatch.setattr(kernels, "build_routing", spy)
    inputs = _inputs(tiny_model, tiles=2)
    tiny_model(**inputs)
    total = inputs["input_ids"].numel()
    assert seen == [(total - 8, 8)]
    tiny_model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False, eos_token_id=None)
    assert seen[-1] == (2 * (total - 8), 16)  # counted on the beam-expanded mask


def test_generated_image_context_id_is_text_during_decode(tiny_model):
    inputs = _inputs(tiny_model)
    out = tiny_model(**inputs, use_cache=True)
    step = tiny_model(input_ids=torch.tensor([[IMG_CONTEXT_ID]]), past_key_values=out.past_key_values, use_cache=True)
    assert torch.isfinite(step.logits).all() and step.visual_token_mask is None


def test_routing_runs_on_meta_tensors_so_it_reads_no_values():
    # Any .item(), .tolist() or boolean-mask indexing on the routed path fails on the meta device; the decoder
    # forward with a visual mask must not need one (the text/visual split stays on the device).
    # bf16: the meta kernel of torch._grouped_mm (the sync-free path) mirrors the CUDA one, which wants bf16.
    with torch.device("meta"):
        model = MonoInternVL(tiny_config()).to(torch.bfloat16)
        lm = model.language_model
        embeds = torch.randn(2, 12, 64, dtype=torch.bfloat16)
        mask = torch.arange(24).reshape(2, 12) % 3 == 0
        out = lm(inputs_embeds=embeds, visual_token_mask=mask, use_cache=False)
    assert out.logits.shape == (2, 12, 128) and out.logits.device.type == "meta"


def test_count_mismatch_between_context_tokens_and_tiles_is_an_error(tiny_model):
    inputs = _inputs(tiny_model, tiles=2)
    inputs["pixel_values"] = torch.randn(3, 3, 56, 56)
    with pytest.raises(ValueError, match=r"8 <IMG_CONTEXT> tokens .* 3 tiles x 4 tokens = 12"):
        tiny_model(**inputs)


def test_context_tokens_without_pixels_are_an_error(tiny_model):
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_model(input_ids=image_prompt(1, 4))


def test_image_flags_drop_dummy_tiles(tiny_model):
    inputs = _inputs(tiny_model, tiles=2)
    extra = torch.randn(1, 3, 56, 56)
    with_dummy = tiny_model(
        pixel_values=torch.cat([inputs["pixel_values"], extra]), input_ids=inputs["input_ids"],
        image_flags=torch.tensor([1, 1, 0]),
    ).logits
    torch.testing.assert_close(with_dummy, tiny_model(**inputs).logits, rtol=0, atol=0)


def test_visual_attention_experts_off_by_default_and_routed_when_on():
    base = MonoInternVL(tiny_config())
    assert not any("attention_ve" in k for k in base.state_dict())
    model = MonoInternVL(tiny_config(visual_attention_experts=True)).eval()
    randomize_norms(model)
    names = [k for k in model.state_dict() if "attention_ve" in k]
    assert sorted({n.split(".")[-2] for n in names}) == ["wo", "wqkv"]
    ids = torch.randint(3, 96, (1, 9))
    text_before = model(input_ids=ids).logits
    inputs = _inputs(model)
    img_before = model(**inputs).logits
    with torch.no_grad():
        for layer in model.language_model.model.layers:
            layer.attention_ve.wqkv.weight.normal_()
    assert torch.equal(model(input_ids=ids).logits, text_before)
    assert not torch.allclose(model(**inputs).logits, img_before)


def test_beam_search_with_images_matches_single_prompt_runs(tiny_model):
    # Beam search repeats every model input per beam; the routing mask must follow, or rows would mix.
    ids = [image_prompt(2, 4, seed=0), image_prompt(1, 4, seed=1, suffix=10)]
    pixels = [torch.randn(2, 3, 56, 56), torch.randn(1, 3, 56, 56)]
    kw = dict(max_new_tokens=5, num_beams=3, do_sample=False, eos_token_id=None)
    both = tiny_model.generate(pixel_values=torch.cat(pixels), input_ids=torch.cat(ids), **kw)
    for i in range(2):
        assert torch.equal(both[i], tiny_model.generate(pixel_values=pixels[i], input_ids=ids[i], **kw)[0])
