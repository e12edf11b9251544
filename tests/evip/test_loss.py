"""Weighted cross entropy: chunked == unchunked == a plain loop; the step normalisation is independent of batching."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from evip.data.collate import collate
from evip.data.types import Example
from evip.loss import scale_loss, step_denominator, weighted_ce

V = 37


def _inputs(seed: int, b: int = 3, t: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, V, generator=g) * 3
    targets = torch.randint(0, V, (b, t), generator=g)
    targets[torch.rand(b, t, generator=g) < 0.3] = -100
    weights = torch.rand(b, t, generator=g) * (targets != -100)
    return logits, targets, weights


def test_weighted_ce_matches_a_plain_loop():
    logits, targets, weights = _inputs(0)
    loss_sum, weight_sum = weighted_ce(logits, targets, weights)
    expect = 0.0
    for i in range(targets.shape[0]):
        for j in range(targets.shape[1]):
            if targets[i, j] != -100:
                expect += float(weights[i, j]) * -float(torch.log_softmax(logits[i, j].double(), -1)[targets[i, j]])
    assert loss_sum.dtype == torch.float32 and loss_sum.item() == pytest.approx(expect, rel=1e-5)
    assert weight_sum.item() == pytest.approx(float(weights.sum()), rel=1e-6)


@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 32, 1000])
def test_chunked_equals_unchunked(chunk_tokens):
    logits, targets, weights = _inputs(1)
    ref_logits = logits.clone().requires_grad_()
    ref_sum, ref_w = weighted_ce(ref_logits, targets, weights, chunk_tokens=10_000)
    ref_sum.backward()
    bf_logits = logits.clone().to(torch.bfloat16).requires_grad_()  # bf16 logits are upcast to fp32 per chunk

    chunk_logits = logits.clone().requires_grad_()
    loss_sum, w = weighted_ce(chunk_logits, targets, weights, chunk_tokens=chunk_tokens)
    loss_sum.backward()
    torch.testing.assert_close(loss_sum, ref_sum, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(chunk_logits.grad, ref_logits.grad, rtol=1e-6, atol=1e-7)

    bf_sum, _ = weighted_ce(bf_logits, targets, weights, chunk_tokens=chunk_tokens)
    assert bf_sum.dtype == torch.float32
    bf_sum.backward()
    assert bf_logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(bf_logits.grad.float(), ref_logits.grad, rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        no_grad_sum, _ = weighted_ce(logits, targets, weights, chunk_tokens=chunk_tokens)
        torch.testing.assert_close(no_grad_sum, ref_sum.detach())


def test_weighted_ce_rejects_mismatched_shapes():
    logits, targets, weights = _inputs(2)
    with pytest.raises(ValueError, match="logits \\(B, T, V\\)"):
        weighted_ce(logits, targets[:, :-1], weights)


# ----------------------------------------------------------------------------------------- normalisation


class ToyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, 8)
        self.mix = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, V)

    def forward(self, ids_BT):
        x = self.emb(ids_BT)
        x = x + torch.tanh(self.mix(x.cumsum(1)))  # position-dependent, like a real LM
        return self.head(x)


def _examples():
    out = []
    for i, (length, supervised) in enumerate([(5, 1), (9, 7), (4, 3), (12, 2), (7, 6), (6, 4)]):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(1, V, (length,), generator=g)
        labels = torch.full((length,), -100)
        labels[length - supervised :] = ids[length - supervised :]
        out.append(Example(sample_id=f"s{i}", input_ids_L=ids, labels_L=labels))
    return out


def _step_grads(ranks: list[list[list[Example]]], weighting: str, naive: bool = False) -> dict[str, torch.Tensor]:
    """Gradient of one optimizer step: ``ranks[r]`` = rank r's micro-batches (each a list of examples, one per
    row). Ranks are simulated: each accumulates its own gradient, then the gradients are averaged as FSDP does."""
    torch.manual_seed(0)
    model = ToyLM()
    world = len(ranks)
    batches = [
        [collate([[ex] for ex in mb], max_seq_len=64, weighting=weighting, pad_id=0, image_size=4) for mb in micro]
        for micro in ranks
    ]
    denominator = sum(step_denominator(rank_batches) for rank_batches in batches)  # the all-reduce, by hand
    rank_grads = []
    for rank_batches in batches:
        model.zero_grad()
        for batch in rank_batches:
            loss_sum, w = weighted_ce(model(batch.input_ids_BT), batch.targets_BT, batch.weights_BT)
            loss = loss_sum / w / len(rank_batches) if naive else scale_loss(loss_sum, denominator, world)
            loss.backward()
        rank_grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return {n: sum(g[n] for g in rank_grads) / world for n in rank_grads[0]}


@pytest.mark.parametrize("weighting", ["token", "sample", "square"])
def test_step_gradient_independent_of_micro_batching(weighting):
    ex = _examples()
    one = _step_grads([[ex]], weighting)
    three = _step_grads([[ex[0:2], ex[2:3], ex[3:6]]], weighting)  # accumulation 3, uneven micro-batches
    two_ranks = _step_grads([[ex[0:1], ex[1:3]], [ex[3:4], ex[4:6]]], weighting)
    for name in one:
        torch.testing.assert_close(three[name], one[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(two_ranks[name], one[name], rtol=1e-5, atol=1e-7)
    # the per-micro-batch mean that the convention replaces does depend on the split
    naive = _step_grads([[ex[0:2], ex[2:3], ex[3:6]]], weighting, naive=True)
    assert not all(torch.allclose(naive[n], one[n], rtol=1e-3) for n in one)


def test_step_denominator_sums_weights_and_refuses_empty_steps(tmp_path):
    ex = _examples()
    batches = [collate([[e] for e in ex[:3]], max_seq_len=64, weighting="square", pad_id=0, image_size=4)]
    expect = sum(e.num_targets / math.sqrt(e.num_targets) for e in ex[:3])
    assert step_denominator(batches) == pytest.approx(expect)
    empty = collate([[ex[0]]], max_seq_len=64, weighting="token", pad_id=0, image_size=4)
    empty.weights_BT.zero_()
    with pytest.raises(ValueError, match="total loss weight of 0.0"):
        step_denominator([empty])
    # through a real (one-process) process group: the all-reduce path
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert step_denominator(batches) == pytest.approx(expect)
        loss = scale_loss(torch.tensor(3.0), 2.0)
        assert loss.item() == 1.5
    finally:
        dist.destroy_process_group()
    assert scale_loss(torch.tensor(3.0), 2.0, world_size=4).item() == 6.0
