"""The InternLM2 decoder: grouped wqkv, RoPE scaling, padding, KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from mono import InternLM2Config, InternLM2ForCausalLM
from mono.internlm2 import PackedSequences, rope_inv_freq


def _lm(**overrides):
    cfg = dict(
        architectures=["InternLM2ForCausalLM"], vocab_size=64, hidden_size=48, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=10000.0,
    )
    cfg.update(overrides)
    model = InternLM2ForCausalLM(InternLM2Config(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _explicit_attention(attn, x, positions, theta):
    """Per-head loop from the grouped layout: q head j uses kv head j // r."""
    b, l, d = x.shape
    h, k, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    r = h // k
    w = attn.wqkv.weight.view(k, r + 2, hd, d)
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
    ang = positions.float()[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    heads = []
    for j in range(h):
        g = j // r
        q = rope(x @ w[g, j % r].t())
        kk = rope(x @ w[g, r].t())
        v = x @ w[g, r + 1].t()
        s = (q @ kk.transpose(-1, -2)) / math.sqrt(hd)
        s = s.masked_fill(torch.ones(l, l, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(torch.softmax(s, -1) @ v)
    return attn.wo(torch.cat(heads, -1))


def test_grouped_wqkv_matches_explicit_per_head_computation():
    model = _lm()
    attn = model.model.layers[0].attention
    x = torch.randn(1, 9, 48)
    pos = torch.arange(9)
    from mono.internlm2 import rope_cos_sin

    cos, sin = rope_cos_sin(model.config, pos[None], 9, x.dtype)
    ours = attn(x, cos, sin, None, None, None, None)
    torch.testing.assert_close(ours, _explicit_attention(attn, x, pos, 10000.0), rtol=1e-5, atol=1e-5)


def _greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def test_kv_cache_generation_equals_full_recomputation():
    model = _lm()
    ids = torch.randint(3, 64, (1, 7))
    expect = _greedy_without_cache(model, ids, 10)
    got = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, expect)
    # and the cached logits themselves agree with a full forward, step by step
    out = model(input_ids=expect[:, :7], use_cache=True)
    cache = out.past_key_values
    for t in range(7, expect.shape[1]):
        step = model(input_ids=expect[:, t : t + 1], past_key_values=cache, use_cache=True)
        full = model(input_ids=expect[:, : t + 1], use_cache=False).logits[:, -1]
        torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-5, atol=1e-5)
        cache = step.past_key_values


def test_dynamic_ntk_past_max_positions_uses_the_padded_length():
    model = _lm(max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 2.0})
    cfg = model.config
    inv_short, _ = rope_inv_freq(cfg, 16, torch.device("cpu"))
    inv_long, _ = rope_inv_freq(cfg, 24, torch.device("cpu"))
    hd = cfg.head_dim
    base = 10000.0 * ((2.0 * 24 / 16) - 1.0) ** (hd / (hd - 2))
    torch.testing.assert_close(inv_long, 1.0 / (base ** (torch.arange(0, hd, 2).float() / hd)), rtol=0, atol=0)
    torch.testing.assert_close(inv_short, 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd)), rtol=0, atol=0)
    # A 20-token sequence left-padded to 24: the base comes from 24 (the padded batch length), as in the release.
    ids = torch.randint(3, 64, (1, 20))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], 1)
    a = model(input_ids=padded, attention_mask=mask).logits[:, 4:]
    b = model(input_ids=ids).logits  # length 20: base from 20, a different scaling
    assert not torch.allclose(a, b, atol=1e-4)
    # Beyond the rope context the model refuses, naming both numbers.
    with pytest.raises(ValueError, match="exceeds the model's context of 32"):
        model(input_ids=torch.randint(3, 64, (1, 33)))


def test_linear_rope_scaling_divides_positions_as_the_release():
    # factor 3: dividing and multiplying by 1/3 round differently; the release builds t / factor.
    model = _lm(rope_scaling={"type": "linear", "factor": 3.0}, max_position_embeddings=4096)
    from mono.internlm2 import rope_cos_sin

    pos = torch.arange(4096)[None]
    cos, sin = rope_cos_sin(model.config, pos, 4096, torch.float32)
    hd = model.config.head_dim
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(4096).float() / 3.0, inv)
    emb = torch.cat([freqs, freqs], -1)
    assert torch.equal(cos[0, 0], emb.cos()) and torch.equal(sin[0, 0], emb.sin())


def test_4d_masks_bool_and_additive_agree():
    model = _lm()
    ids = torch.randint(3, 64, (2, 8))
    causal = torch.ones(8, 8, dtype=torch.bool).tril()[None, None].expand(2, 1, 8, 8)
    additive = torch.zeros(2, 1, 8, 8).masked_fill(~causal, torch.finfo(torch.float32).min)
    plain = model(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids, attention_mask=causal).logits, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=additive).logits, plain, rtol=1e-5, atol=1e-5)


def test_left_padded_batch_equals_unpadded_single_runs():
    model = _lm()
    seqs = [torch.randint(3, 64, (n,)) for n in (5, 9, 7)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = s
        mask[i, width - len(s) :] = 1
    batched = model(input_ids=ids, attention_mask=mask).logits
    for i, s in enumerate(seqs):
        single = model(input_ids=s[None]).logits[0]
        torch.testing.assert_close(batched[i, width - len(s) :], single, rtol=1e-5, atol=1e-5)
    # generation too: left-padded batch greedy == single greedy
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    for i, s in enumerate(seqs):
        single = model.generate(input_ids=s[None], max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(gen[i, width:], single[0, len(s) :])


def test_rmsnorm_is_computed_in_fp32():
    from mono.internlm2 import RMSNorm

    norm = RMSNorm(8, 1e-5)
    x = (torch.randn(3, 8) * 300).to(torch.bfloat16)
    ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(norm(x), ref)


def test_loss_ignores_minus_100():
    model = _lm()
    ids = torch.randint(3, 64, (2, 6))
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(input_ids=ids, labels=labels)
    manual = F.cross_entropy(out.logits[:, 2:-1].reshape(-1, 64), ids[:, 3:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)


def test_logits_to_keep_selects_positions_of_the_full_logits():
    model = _lm()
    ids = torch.randint(3, 64, (2, 9))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids, logits_to_keep=3).logits, full[:, -3:], rtol=1e-6, atol=1e-6)
        index = torch.tensor([0, 4, 8])
        torch.testing.assert_close(model(input_ids=ids, logits_to_keep=index).logits, full[:, index], rtol=1e-6,
                                   atol=1e-6)
        mask = torch.zeros(2, 9, dtype=torch.bool)
        mask[0, [1, 5]] = True
        mask[1, [0, 2, 8]] = True
        got = model(input_ids=ids, logits_to_keep=mask).logits
    assert got.shape == (5, 64)
    torch.testing.assert_close(got, full[mask], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "keep, match",
    [(-1, "int >= 0"), (torch.zeros(2, 8, dtype=torch.bool), r"mask has shape \(2, 8\)"),
     (torch.zeros(2, 2, dtype=torch.long), "1-D")],
)
def test_logits_to_keep_rejects_bad_values(keep, match):
    with pytest.raises(ValueError, match=match):
        _lm()(input_ids=torch.randint(3, 64, (2, 9)), logits_to_keep=keep)


def test_labels_need_every_position():
    ids = torch.randint(3, 64, (1, 6))
    with pytest.raises(ValueError, match="logits_to_keep=0"):
        _lm()(input_ids=ids, labels=ids, logits_to_keep=1)


def test_generate_computes_logits_of_the_last_prompt_position_only():
    # transformers passes logits_to_keep=1; prefilling a long prompt must not build (B, L, V) fp32 logits.
    model = _lm()
    rows = []
    hook = model.output.register_forward_hook(lambda mod, args, out: rows.append(tuple(args[0].shape)))
    ids = torch.randint(3, 64, (1, 11))
    try:
        got = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    finally:
        hook.remove()
    assert rows[0] == (1, 1, 48) and all(r == (1, 1, 48) for r in rows), rows
    assert torch.equal(got, _greedy_without_cache(model, ids, 4))


def _block_mask(row_lengths, width):
    seg = torch.full((len(row_lengths), width), -1)
    for b, lengths in enumerate(row_lengths):
        start = 0
        for k, n in enumerate(lengths):
            seg[b, start:start + n] = k
            start += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal & (seg >= 0)[:, :, None]
    return (mask | torch.eye(width, dtype=torch.bool))[:, None], seg >= 0


def _positions(row_lengths, width):
    pos = torch.zeros(len(row_lengths), width, dtype=torch.long)
    for b, lengths in enumerate(row_lengths):
        start = 0
        for n in lengths:
            pos[b, start:start + n] = torch.arange(n)
            start += n
    return pos


def test_packed_sequences_equal_the_block_mask_and_single_runs():
    # Lengths straddle the 16/32/64 buckets; row 1 ends in padding.
    torch.manual_seed(0)
    model = _lm(max_position_embeddings=128).train()
    rows, width = [[3, 16, 17, 40, 1], [33, 20]], 77
    ids = torch.randint(3, 64, (2, width))
    pos = _positions(rows, width)
    block, real = _block_mask(rows, width)
    packed = PackedSequences.from_lengths(rows, width)
    assert [tuple(b[0].shape) for b in packed.buckets] == [(3, 16), (2, 20), (2, 40)]

    logits_block = model(input_ids=ids, attention_mask=block, position_ids=pos).logits
    logits_packed = model(input_ids=ids, attention_mask=packed, position_ids=pos).logits
    torch.testing.assert_close(logits_packed[real], logits_block[real], rtol=1e-5, atol=1e-5)
    start = 0
    for n in rows[0]:  # each sample alone gives the same logits
        single = model(input_ids=ids[:1, start:start + n]).logits[0]
        torch.testing.assert_close(logits_packed[0, start:start + n], single, rtol=1e-5, atol=1e-5)
        start += n

    grads = []
    for mask in (block, packed):
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        (logits[real].float().square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_packed_row_may_outgrow_the_context_when_its_samples_fit():
    # Positions restart per sample, so only the longest sample must fit max_position_embeddings (64 here).
    torch.manual_seed(0)
    model = _lm()
    rows, width = [[40, 50]], 96
    ids = torch.randint(3, 64, (1, width))
    packed = PackedSequences.from_lengths(rows, width)
    assert packed.longest == 50
    logits = model(input_ids=ids, attention_mask=packed, position_ids=_positions(rows, width)).logits
    torch.testing.assert_close(logits[0, 40:90], model(input_ids=ids[:, 40:90]).logits[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sequence of 96 tokens"):
        model(input_ids=ids)
    too_long = PackedSequences.from_lengths([[20, 70]], width)
    with pytest.raises(ValueError, match="packed sample of 70 tokens exceeds the model's context of 64"):
        model(input_ids=ids, attention_mask=too_long, position_ids=_positions([[20, 70]], width))


def test_packed_sequences_refuse_what_they_cannot_do():
    model = _lm()
    ids = torch.randint(3, 64, (1, 8))
    packed = PackedSequences.from_lengths([[5, 3]], 8)
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids=ids, attention_mask=packed)
    with pytest.raises(ValueError, match=r"\(1, 9\)"):
        model(input_ids=torch.randint(3, 64, (1, 9)), attention_mask=packed, position_ids=torch.arange(9)[None])
    with pytest.raises(ValueError, match="do not fit"):
        PackedSequences.from_lengths([[5, 4]], 8)
    with pytest.raises(ValueError, match=">= 1"):
        PackedSequences.from_lengths([[5, 0]], 8)
    out = model(input_ids=ids[:, :5], use_cache=True)
    with pytest.raises(ValueError, match="KV cache"):
        model(input_ids=ids[:, 5:], attention_mask=PackedSequences.from_lengths([[3]], 3),
              position_ids=torch.arange(5, 8)[None], past_key_values=out.past_key_values)
