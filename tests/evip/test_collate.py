"""Collation and packing: positions, masks, shifted targets, loss weights, tiles; packed == unpacked on a real model."""

from __future__ import annotations

import math

import pytest
import torch

from evip.data.collate import Packer, collate, loss_weights, pad_id_of
from evip.data.types import Example
from evip.loss import weighted_ce
from mono import MonoInternVL
from tests.mono.conftest import IMG_CONTEXT_ID, image_prompt, randomize_norms, tiny_config

S = 56  # tile size of tiny_config: (56 / 14)^2 * 0.5^2 = 4 visual tokens per tile
PAD = 0


def text_example(sample_id: str, length: int, num_supervised: int, seed: int) -> Example:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (length,), generator=g)
    labels = torch.full((length,), -100)
    labels[length - num_supervised :] = ids[length - num_supervised :]
    return Example(sample_id=sample_id, input_ids_L=ids, labels_L=labels)


def image_example(sample_id: str, num_tiles: int, num_supervised: int, seed: int) -> Example:
    ids = image_prompt(num_tiles, 4, seed=seed)[0]
    labels = torch.full_like(ids, -100)
    labels[len(ids) - num_supervised :] = ids[len(ids) - num_supervised :]
    g = torch.Generator().manual_seed(seed + 1000)
    return Example(
        sample_id=sample_id, input_ids_L=ids, labels_L=labels,
        pixel_values_N=torch.randn(num_tiles, 3, S, S, generator=g), num_tiles=[num_tiles],
        num_visual_tokens=4 * num_tiles,
    )


def _collate(rows, weighting="token", max_seq_len=256):
    return collate(rows, max_seq_len=max_seq_len, weighting=weighting, pad_id=PAD, image_size=S)


def test_loss_weights():
    assert loss_weights(4, "token") == 1.0
    assert loss_weights(4, "sample") == 0.25
    assert loss_weights(4, "square") == 0.5
    assert loss_weights(0, "square") == 0.0
    with pytest.raises(ValueError, match="unknown loss weighting 'mean'"):
        loss_weights(3, "mean")


def test_packed_row_positions_targets_weights_and_mask():
    a = text_example("a", 5, 3, seed=1)
    b = text_example("b", 4, 2, seed=2)
    c = text_example("c", 6, 6, seed=3)
    batch = _collate([[a, b], [c]], weighting="square")
    assert batch.input_ids_BT.shape == (2, 9) and batch.sample_ids == ["a", "b", "c"]
    assert batch.position_ids_BT[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert batch.position_ids_BT[1, :6].tolist() == list(range(6))
    assert batch.input_ids_BT[1, 6:].tolist() == [PAD] * 3
    # targets are the next label of the same sample; the last token of each sample and padding predict nothing
    assert batch.targets_BT[0, :4].tolist() == a.labels_L[1:].tolist()
    assert batch.targets_BT[0, 4] == -100
    assert batch.targets_BT[0, 5:8].tolist() == b.labels_L[1:].tolist() and batch.targets_BT[0, 8] == -100
    assert batch.targets_BT[1, :5].tolist() == c.labels_L[1:].tolist() and (batch.targets_BT[1, 5:] == -100).all()
    # weights: 1/sqrt(n) at each of a sample's targets (c has 5 targets: its first label is not a target)
    assert a.num_targets == 3 and b.num_targets == 2 and c.num_targets == 5
    expect = torch.zeros(2, 9)
    expect[0, 1:4] = 1 / math.sqrt(3)
    expect[0, 6:8] = 1 / math.sqrt(2)
    expect[1, 0:5] = 1 / math.sqrt(5)
    torch.testing.assert_close(batch.weights_BT, expect)
    assert ((batch.weights_BT > 0) == (batch.targets_BT != -100)).all()
    # the mask, from an independent brute-force rule
    segments = [[0] * 5 + [1] * 4, [0] * 6 + [-1] * 3]
    mask = batch.attention_mask_BTT
    assert mask.shape == (2, 1, 9, 9) and mask.dtype == torch.bool
    for r in range(2):
        for q in range(9):
            for k in range(9):
                sq, sk = segments[r][q], segments[r][k]
                allowed = (q == k) if sq < 0 else (sq == sk and k <= q)
                assert bool(mask[r, 0, q, k]) == allowed, (r, q, k)
    assert mask.any(dim=-1).all()  # no query row without a key (NaN in softmax)
    assert batch.num_text_tokens == 15 and batch.num_visual_tokens == 0 and batch.seq_lens == [5, 4, 6]


def test_pad_id_of():
    class Tok:
        pad_token_id, eos_token_id = None, 2

    assert pad_id_of(Tok()) == 2
    Tok.pad_token_id = 7
    assert pad_id_of(Tok()) == 7
    assert pad_id_of(object()) == 0


def test_unpacked_mask_only_when_needed():
    a = text_example("a", 5, 3, seed=1)
    b = text_example("b", 5, 2, seed=2)
    c = text_example("c", 3, 2, seed=3)
    assert _collate([[a]]).attention_mask_BTT is None
    assert _collate([[a], [b]]).attention_mask_BTT is None  # same lengths: plain causal per row
    padded = _collate([[a], [c]])
    mask = padded.attention_mask_BTT
    assert mask is not None
    assert torch.equal(mask[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())
    assert torch.equal(mask[1, 0, 3:], torch.eye(5, dtype=torch.bool)[3:])  # padding sees only itself
    assert torch.equal(mask[1, 0, :3, :3], torch.ones(3, 3, dtype=torch.bool).tril()) and not mask[1, 0, :3, 3:].any()


def test_tiles_in_order_and_dummy_tile_without_images():
    text = _collate([[text_example("t", 6, 2, seed=0)]])
    assert text.pixel_values_N.shape == (1, 3, S, S) and not text.pixel_values_N.any()
    assert text.image_flags_N.tolist() == [0]
    x = image_example("x", 2, 3, seed=1)
    t = text_example("t", 6, 2, seed=2)
    y = image_example("y", 1, 3, seed=3)
    batch = _collate([[x, t], [y]])
    torch.testing.assert_close(batch.pixel_values_N, torch.cat([x.pixel_values_N, y.pixel_values_N]))
    assert batch.image_flags_N.tolist() == [1, 1, 1]
    assert batch.num_visual_tokens == 12 and batch.num_text_tokens == len(x) + len(t) + len(y) - 12
    # each image span stays whole and in its sample's place
    assert torch.equal(batch.input_ids_BT[0, : len(x)], x.input_ids_L)
    ctx = (batch.input_ids_BT[0] == IMG_CONTEXT_ID).nonzero().reshape(-1)
    assert ctx.tolist() == list(range(6, 14))


def test_collate_rejects_bad_rows():
    a = text_example("long", 10, 2, seed=0)
    with pytest.raises(ValueError, match="row 0 holds 10 tokens > max_seq_len 8"):
        _collate([[a]], max_seq_len=8)
    bad = image_example("img", 1, 2, seed=0)
    bad.pixel_values_N = torch.zeros(1, 3, 28, 28)
    with pytest.raises(ValueError, match="sample img: tiles must be"):
        _collate([[bad]])
    with pytest.raises(ValueError, match="at least one row"):
        _collate([[a], []])


def test_packer_first_fit_never_splits_and_reports_fill():
    lengths = [7, 3, 9, 2, 6, 5, 8, 1, 4, 10, 3, 3]
    examples = [text_example(f"s{i}", n, 1, seed=i) for i, n in enumerate(lengths)]

    def run():
        packer = Packer(max_seq_len=12, buffer_size=2)
        packs = []
        for i, ex in enumerate(examples):
            packs.extend(packer.add(i, ex))
        packs.extend(packer.flush())
        return packer, packs

    packer, packs = run()
    keys = [p.keys for p in packs]
    assert sorted(k for ks in keys for k in ks) == list(range(len(lengths)))  # every example exactly once
    assert all(p.num_tokens == sum(lengths[k] for k in p.keys) <= 12 for p in packs)
    assert keys == [p.keys for p in run()[1]]  # deterministic
    assert keys[0] == [0, 1, 3]  # first fit: 7 + 3 + 2 = 12 closes exactly full
    assert packer.fill_ratio == pytest.approx(sum(lengths) / (12 * len(packs)))
    with pytest.raises(ValueError, match="sample big has 13 tokens > max_seq_len 12"):
        Packer(12).add(0, text_example("big", 13, 1, seed=0))


def test_packer_closes_fullest_when_buffer_overflows():
    packer = Packer(max_seq_len=10, buffer_size=2)
    assert packer.add("a", text_example("a", 6, 1, 0)) == []
    assert packer.add("b", text_example("b", 8, 1, 1)) == []
    closed = packer.add("c", text_example("c", 7, 1, 2))  # three open packs > 2: the fullest (b, 8) goes
    assert [p.keys for p in closed] == [["b"]]
    assert [p.keys for p in packer.open] == [["a"], ["c"]]


# ------------------------------------------------------------------------------------------ packed == unpacked


def _forward_loss(model, batch, attention="mask"):
    mask = batch.packed if attention == "segments" and batch.packed is not None else batch.attention_mask_BTT
    logits = model(
        input_ids=batch.input_ids_BT, attention_mask=mask, position_ids=batch.position_ids_BT,
        pixel_values=batch.pixel_values_N, image_flags=batch.image_flags_N,
    ).logits
    return weighted_ce(logits, batch.targets_BT, batch.weights_BT)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["mask", "segments"])
@pytest.mark.parametrize("weighting", ["token", "sample", "square"])
def test_packed_loss_and_grads_equal_unpacked(weighting, attention):
    # "mask": the (B, 1, T, T) block-diagonal mask; "segments": batch.packed, attention per sample (the trainer's)
    torch.manual_seed(0)
    model = MonoInternVL(tiny_config())
    randomize_norms(model)
    examples = [
        image_example("img1", 1, 5, seed=1),
        text_example("txt1", 9, 4, seed=2),
        image_example("img2", 2, 6, seed=3),
        text_example("txt2", 6, 1, seed=4),
        text_example("txt3", 11, 7, seed=5),
    ]
    unpacked_sum, unpacked_w = torch.zeros(()), torch.zeros(())
    parts = []
    for ex in examples:
        single = _collate([[ex]], weighting=weighting)
        assert single.attention_mask_BTT is None
        loss_sum, w = _forward_loss(model, single)
        parts.append(loss_sum)
        unpacked_sum, unpacked_w = unpacked_sum + loss_sum, unpacked_w + w
    (unpacked_sum / unpacked_w).backward()
    expect_grads = _grads(model)
    expect_w = sum(ex.num_targets * loss_weights(ex.num_targets, weighting) for ex in examples)
    assert unpacked_w.item() == pytest.approx(expect_w)

    # one packed row with all five, then two padded packed rows (padding rows must stay finite and silent)
    for rows in ([examples], [examples[:2], examples[2:]]):
        model.zero_grad()
        packed = _collate(rows, weighting=weighting)
        assert packed.packed is not None
        loss_sum, w = _forward_loss(model, packed, attention)
        torch.testing.assert_close(loss_sum, unpacked_sum, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w, unpacked_w, atol=1e-6, rtol=1e-6)
        (loss_sum / w).backward()
        grads = _grads(model)
        assert grads.keys() == expect_grads.keys()
        assert any(n.startswith("vision_model.") for n in grads)
        for name, g in grads.items():
            torch.testing.assert_close(g, expect_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # the losses are not all the same number (so equality above is not vacuous)
    assert len({round(p.item(), 4) for p in parts}) == len(parts)
