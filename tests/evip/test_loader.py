"""The training loader: deterministic order, exact resume (workers, packing), rank coverage, repeats, skips,
errors naming the sample, resume on another world size."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from evip.data.loader import SampleError, TrainLoader, _Permutation, merge_states, repeat_count
from evip.data.types import Example, RawSample, SkipSample

PAD, S = 0, 8
INDEX_TOKEN, EPOCH_TOKEN = 10_000, 5_000  # each fake example starts with (INDEX_TOKEN + index, EPOCH_TOKEN + epoch)


class FakeSource:
    """``n`` samples ``name.jsonl:1..n``; ``bad`` maps a 0-based index to the skip reason ``get`` raises."""

    def __init__(self, name: str, n: int, repeat: float = 1.0, bad: dict[int, str] | None = None, crash: int = -1):
        self.name, self.n, self.repeat, self.bad, self.crash = name, n, repeat, bad or {}, crash

    def __len__(self) -> int:
        return self.n

    def get(self, i: int) -> RawSample:
        if i == self.crash:
            raise KeyError("no such field 'conversations'")
        if i in self.bad:
            raise SkipSample(self.bad[i], f"{self.name}.jsonl:{i + 1}", "unreadable")
        return RawSample(sample_id=f"{self.name}.jsonl:{i + 1}", dataset=self.name, kind="pair", caption=str(i))


class FakePreprocess:
    """Tokens and tiles drawn from a generator seeded by (epoch, index), like the real augmentation; every third
    sample has one image tile. ``too_long`` / ``crash`` name sample ids that raise."""

    def __init__(self, too_long: tuple[str, ...] = (), crash: str = ""):
        self.too_long, self.crash = too_long, crash

    def __call__(self, raw: RawSample, epoch: int) -> Example:
        if raw.sample_id in self.too_long:
            raise SkipSample("too_long", raw.sample_id, "99 tokens > 24")
        if raw.sample_id == self.crash:
            raise ZeroDivisionError("division by zero")
        g = torch.Generator().manual_seed(epoch * 1_000_003 + raw.index)
        text = torch.randint(3, 90, (int(torch.randint(2, 11, (1,), generator=g)),), generator=g)
        head = torch.tensor([INDEX_TOKEN + raw.index, EPOCH_TOKEN + epoch])
        pixel_values, num_visual = None, 0
        if int(raw.caption) % 3 == 0:
            text = torch.cat([text[:1], torch.tensor([98, 100, 100, 100, 100, 99]), text[1:]])
            pixel_values, num_visual = torch.rand(1, 3, S, S, generator=g), 4
        ids = torch.cat([head, text])
        labels = ids.clone()
        labels[:3] = -100
        return Example(raw.sample_id, ids, labels, pixel_values, [1] if num_visual else [], num_visual)


def _sources(**bad):
    return [FakeSource("a", 13, repeat=1.5, bad=bad.get("a")), FakeSource("b", 7, repeat=0.5, bad=bad.get("b"))]


def _loader(sources=None, preprocess=None, **kw) -> TrainLoader:
    args = dict(rank=0, world_size=1, micro_batch_size=2, packed=True, max_seq_len=24, weighting="square", pad_id=PAD,
                image_size=S, seed=3, num_workers=0, pack_buffer=3)
    args.update(kw)
    return TrainLoader(sources if sources is not None else _sources(), preprocess or FakePreprocess(), **args)


def _take(loader: TrainLoader, n: int):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("the loader ended")


def _assert_same(a, b):
    assert a.sample_ids == b.sample_ids
    for name in ("input_ids_BT", "position_ids_BT", "attention_mask_BTT", "targets_BT", "weights_BT", "pixel_values_N",
                 "image_flags_N"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name


def _samples(batch):
    """(epoch, global position, sample id) of each example of a batch, from its first two tokens."""
    ids = batch.input_ids_BT
    starts = ((batch.position_ids_BT == 0) & (ids >= INDEX_TOKEN)).nonzero().tolist()
    out = [(int(ids[r, c + 1]) - EPOCH_TOKEN, int(ids[r, c]) - INDEX_TOKEN) for r, c in starts]
    assert len(out) == len(batch.sample_ids)
    return [(e, p, sid) for (e, p), sid in zip(out, batch.sample_ids)]


# ------------------------------------------------------------------------------------------------ order


def test_repeat_count_and_permutation():
    assert repeat_count(10, 1.5) == 15 and repeat_count(10, 0.3) == 3 and repeat_count(7, 2) == 14
    assert repeat_count(100, 0.29) == 29  # the decimal, not 28.999... floored
    with pytest.raises(ValueError, match="repeat must be > 0"):
        repeat_count(10, 0)
    for n in [1, 2, 3, 5, 16, 17, 63, 1000]:
        perm = _Permutation(n, seed=1, epoch=0)
        assert sorted(perm(i) for i in range(n)) == list(range(n))
    order = [_Permutation(1000, 1, 0)(i) for i in range(1000)]
    assert order != list(range(1000))
    assert order != [_Permutation(1000, 1, 1)(i) for i in range(1000)]  # new order each epoch
    assert order != [_Permutation(1000, 2, 0)(i) for i in range(1000)]  # and per seed


def test_epoch_mixture_with_repeat_factors():
    loader = _loader([FakeSource("a", 4, repeat=2.5), FakeSource("b", 5, repeat=0.4)], packed=False, shuffle=False,
                     micro_batch_size=3)
    seen = [s for batch in _take(loader, 4) for s in _samples(batch)]  # 12 samples: one epoch of 12 positions
    assert [p for _, p, _ in seen] == list(range(12)) and {e for e, _, _ in seen} == {0}
    expect = [f"a.jsonl:{i}" for i in [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]] + ["b.jsonl:1", "b.jsonl:2"]
    assert [sid for _, _, sid in seen] == expect
    shuffled = _loader([FakeSource("a", 4, repeat=2.5), FakeSource("b", 5, repeat=0.4)], packed=False,
                       micro_batch_size=3)
    ids = [sid for batch in _take(shuffled, 4) for sid in batch.sample_ids]
    assert Counter(ids) == Counter(sid for _, _, sid in seen) and ids != [sid for _, _, sid in seen]


# ------------------------------------------------------------------------------------------ determinism, resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_constructions_give_the_same_batches(num_workers):
    a = _take(_loader(num_workers=num_workers), 8)
    b = _take(_loader(num_workers=num_workers), 8)
    for x, y in zip(a, b):
        _assert_same(x, y)
    assert len({tuple(x.sample_ids) for x in a}) == len(a)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact(packed, num_workers, tmp_path):
    bad = {"a": {2: "corrupt_image", 9: "missing_image"}, "b": {1: "malformed_json"}}
    pre = FakePreprocess(too_long=("a.jsonl:5",))
    kw = dict(packed=packed, num_workers=num_workers)
    total = 16  # crosses at least one epoch boundary (22 samples an epoch, 3 of them bad)
    ref = _loader(_sources(**bad), pre, skip_log=tmp_path / "ref.jsonl", **kw)
    expect = _take(ref, total)
    assert ref.epoch >= 1
    pending = set()  # whether some checkpoint caught samples buffered in packs (the hard case)
    for k in (3, 8):
        log = tmp_path / f"run{k}.jsonl"
        first = _loader(_sources(**bad), pre, skip_log=log, **kw)
        head = _take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        pending |= {bool(r["open"] or r["ready"]) for r in state["readers"]}
        assert state["next_reader"] == k % max(1, num_workers)
        _take(first, 3)  # the run goes on past the checkpoint, then "crashes"
        resumed = _loader(_sources(**bad), pre, skip_log=log, **kw)
        resumed.load_state_dict(state)
        tail = _take(resumed, total - k)
        for x, y in zip(head + tail, expect):
            _assert_same(x, y)
        assert resumed.skips.counts == ref.skips.counts
        assert log.read_text() == (tmp_path / "ref.jsonl").read_text()  # every skip logged once
    if packed:
        assert True in pending
        assert any(len(b.sample_ids) > b.input_ids_BT.shape[0] for b in expect)  # rows did hold several samples
        assert 0.5 < ref.fill_ratio <= 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_see_every_sample_of_an_epoch_once(num_workers):
    seen = []
    for rank in range(2):
        loader = _loader(rank=rank, world_size=2, num_workers=num_workers)
        batches = []
        for batch in loader:
            batches.append(batch)
            if loader.epoch >= 1 and len(batches) > 4:
                break
        mine = [(e, p, sid) for b in batches for e, p, sid in _samples(b) if e == 0]
        assert all(p % 2 == rank for _, p, _ in mine)
        seen += mine
    positions = sorted(p for _, p, _ in seen)
    assert positions == list(range(22))  # 13 * 1.5 + 7 * 0.5 = 19 + 3, each exactly once
    expect_ids = Counter([f"a.jsonl:{i}" for i in range(1, 14)] + [f"a.jsonl:{i}" for i in range(1, 7)] +
                         [f"b.jsonl:{i}" for i in range(1, 4)])
    assert Counter(sid for _, _, sid in seen) == expect_ids


# ------------------------------------------------------------------------------------------------ bad data


class ListLogger:
    def __init__(self):
        self.lines: list[str] = []

    def warning(self, msg, *args):
        self.lines.append(msg % args)


def test_skips_counted_once_and_logged(tmp_path):
    bad = {"a": {0: "corrupt_image", 4: "corrupt_image", 7: "corrupt_image", 11: "missing_image"}}
    logger = ListLogger()
    log = tmp_path / "skipped-rank0.jsonl"
    loader = _loader(_sources(**bad), FakePreprocess(too_long=("b.jsonl:2",)), packed=False, shuffle=False,
                     skip_log=log, log_skips=2, logger=logger, micro_batch_size=1)
    # shuffle off: epoch 0 is a:1..13, a:1..6, b:1..3 -> bad: a0, a4, a7, a11 (+ a0, a4 again in the repeat), b1
    batches = _take(loader, 22 - 7)
    assert loader.epoch == 0
    assert loader.skips.counts == Counter(corrupt_image=5, missing_image=1, too_long=1, seen=22, used=15)
    assert loader.skips.skipped == 7
    assert sum(b.num_samples for b in batches) == 15
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["sample_id"] for r in records] == [
        "a.jsonl:1", "a.jsonl:5", "a.jsonl:8", "a.jsonl:12", "a.jsonl:1", "a.jsonl:5", "b.jsonl:2"]
    assert records[-1] == {"sample_id": "b.jsonl:2", "dataset": "b", "reason": "too_long", "detail": "99 tokens > 24",
                           "epoch": 0, "rank": 0}
    # the first two of each reason in full (with the sample id), the rest only counted
    assert len(logger.lines) == 4
    assert "a.jsonl:1" in logger.lines[0] and "corrupt_image" in logger.lines[0]
    assert "further ones are only counted" in logger.lines[1]


def test_a_reader_whose_samples_are_all_bad_fails_loudly():
    source = FakeSource("a", 4, bad={i: "corrupt_image" for i in range(4)})
    with pytest.raises(RuntimeError, match="every one of its 4 samples was skipped"):
        _take(_loader([source]), 1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_other_errors_name_the_sample(num_workers):
    with pytest.raises(SampleError, match=r"reading sample 6 of dataset 'a' .*KeyError"):
        _take(_loader([FakeSource("a", 9, crash=6)], packed=False, shuffle=False, num_workers=num_workers), 9)
    with pytest.raises(SampleError, match=r"preprocessing a.jsonl:3 .*ZeroDivisionError: division by zero"):
        _take(_loader([FakeSource("a", 9)], FakePreprocess(crash="a.jsonl:3"), num_workers=num_workers), 9)


# ------------------------------------------------------------------------------------------ other topologies


def _run_ranks(world: int, k: int, **kw):
    loaders = [_loader(rank=r, world_size=world, **kw) for r in range(world)]
    used = [(e, p) for ld in loaders for b in _take(ld, k) for e, p, _ in _samples(b)]
    return [json.loads(json.dumps(ld.state_dict())) for ld in loaders], used


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 3)])
def test_resume_on_another_world_size_skips_nothing(packed, old_world, new_world):
    states, used = _run_ranks(old_world, 3, packed=packed)
    merged = merge_states(states, new_world)
    assert len(merged) == new_world and merged[0]["skips"]["used"] == len(used)
    logger = ListLogger()
    after = []
    for r in range(new_world):
        loader = _loader(rank=r, world_size=new_world, packed=packed, logger=logger)
        loader.load_state_dict(merged[r])
        for batch in loader:
            after += [(e, p) for e, p, _ in _samples(batch)]
            if loader.epoch >= 2:
                break
    # (an old rank may have been in epoch 1 already: the check covers epochs 0 and 1)
    repeats = 0
    for epoch in (0, 1):
        positions = [p for e, p in used + after if e == epoch]
        assert set(positions) == set(range(22)), epoch  # nothing skipped
        repeats += len(positions) - 22
    assert repeats == merged[0]["repeated"]  # and exactly the reported number read twice
    assert "read again" in logger.lines[0]


def test_same_world_size_merge_is_exact_and_worker_change_is_safe():
    states, used = _run_ranks(2, 3)
    assert merge_states(states, 2) == states
    with pytest.raises(ValueError, match="merge_states needs the states of all 2 ranks"):
        merge_states(states[:1], 1)
    with pytest.raises(ValueError, match="for another world size pass every rank's state through merge_states"):
        _loader().load_state_dict(states[0])
    # the same ranks with 2 workers each: another reader layout, so each rank restarts at its safe position
    after = []
    for r in range(2):
        loader = _loader(rank=r, world_size=2, num_workers=2)
        loader.load_state_dict(states[r])
        for batch in loader:
            after += [(e, p) for e, p, _ in _samples(batch)]
            if loader.epoch >= 1:
                break
    assert {p for e, p in used + after if e == 0} == set(range(22))


def test_changed_data_order_is_refused():
    state = _loader().state_dict()
    with pytest.raises(ValueError, match="seed was 3, now 4"):
        _loader(seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="sources was"):
        _loader([FakeSource("a", 14, repeat=1.5), FakeSource("b", 7, repeat=0.5)]).load_state_dict(state)
