"""The training loader: a deterministic, resumable, infinite stream of micro-batches for one rank.

**Order.** An epoch is the mixture of all sources, each repeated by its ``repeat`` factor (``r`` = ``floor(r)``
full passes plus the first ``frac(r)`` share of the samples; ``r < 1`` = the first share only, as InternVL's
``repeat_time`` does), shuffled by a permutation seeded with ``(seed, epoch)``. The permutation is computed per
position (a keyed Feistel network), never materialised, so a 258M-sample epoch costs no memory. Rank ``r`` of
``W`` reads global positions ``r, r + W, r + 2W, ...``; with ``K`` dataloader workers the rank's positions are
dealt round robin to ``K`` *readers* (reader ``k`` takes position ``r + W*k + W*K*j`` for ``j = 0, 1, ...``).
Every sample's ``RawSample.index`` is its global position, which seeds its augmentation, so a sample is
preprocessed identically whichever rank or worker reads it and however often.

**Batches.** A reader preprocesses its samples in order, packs them (:class:`~evip.data.collate.Packer`) or
takes them one per row, and collates ``micro_batch_size`` rows per batch, inside the worker. The stream never
ends: an epoch's last partial batch continues into the next epoch (so every rank yields the same number of
batches and no collective waits on an exhausted rank); open packs are flushed at the end of an epoch, so a pack
never mixes epochs. With workers, a ``torch.utils.data.DataLoader`` (``batch_size=None``) yields the readers'
batches in strict round robin.

**Bad samples.** :class:`SkipSample` from ``source.get`` or ``preprocess`` skips the sample. The counts (per
reason, plus ``seen`` and ``used``) and the skip records travel with the batch (``Batch.skips``,
``Batch.data_state["skipped"]``), so the main process counts a sample exactly when the batch after it is
consumed: a prefetched batch that a crash discards is not counted, and after a resume nothing is counted twice.
Records go to ``skip_log`` as JSON lines; the first ``log_skips`` of each reason are logged in full. Any other
exception is a bug and is raised again as :class:`SampleError` naming the sample.

**State** (``state_dict``, JSON-able) -- per reader, after the last batch this loader yielded from it::

    {"epoch": e, "next": j, "open": [[[e, j], ...], ...], "ready": [[[e, j], ...], ...]}

``next`` is the reader's next stream index; ``open`` are the packer's open packs and ``ready`` the closed packs
not yet batched, each as the ``(epoch, j)`` keys of its samples. On resume those samples are read again
(preprocessing is deterministic) and the packer restored as it was, so the batches that follow are identical
to an uninterrupted run's. Around it: ``next_reader`` (whose batch comes next), the skip counts, ``epoch``, the
skip log's size (a longer log is cut back to it: the lines after it belong to batches that will be redone), the
layout (rank, world size, readers, packing) and an ``order`` fingerprint (seed, shuffle, sources) that must match.

**Other topologies.** Resuming exactly needs the same rank, world size and reader layout. With another number of
workers (same world size) the loader restarts this rank at its *safe position*: the first global position it had
not yet finished, so nothing is skipped and the few samples read ahead are read again. Across world sizes the
trainer gathers every rank's ``state_dict`` and calls :func:`merge_states`, which restarts all new ranks at the
global safe position and reports how many samples repeat.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import traceback
from bisect import bisect_right
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .collate import WEIGHTINGS, Pack, Packer, collate
from .types import Batch, Example, RawSample, SkipCounter, SkipSample

__all__ = ["SampleError", "TrainLoader", "merge_states", "repeat_count"]

STATE_VERSION = 1
_M64 = (1 << 64) - 1


class SampleError(RuntimeError):
    """A sample failed with an error that is not a :class:`SkipSample`: a bug (in a source, the preprocessor or
    the data), raised with the sample named. The original exception is the ``__cause__``."""


# ---------------------------------------------------------------------------------------------------- order


def repeat_count(num_samples: int, repeat: float) -> int:
    """Samples a source contributes per epoch: ``floor(num_samples * repeat)``, with ``repeat`` read as the
    decimal written (``0.29 * 100`` is 29, not 28 as binary floating point would give)."""
    if not repeat > 0:
        raise ValueError(f"repeat must be > 0, got {repeat}")
    return math.floor(num_samples * Fraction(str(repeat)))


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a cheap 64-bit hash with good avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class _Permutation:
    """A pseudo-random bijection of ``[0, n)`` keyed by ``(seed, epoch)``, evaluated one position at a time.

    A 6-round balanced Feistel network permutes ``[0, 4^h)`` (the smallest power of 4 >= n); positions that land
    outside ``[0, n)`` are walked through the network again until they land inside ("cycle walking"), which
    keeps a bijection. The domain is < 4n, so a position takes fewer than 4 walks on average.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self.half_mask = (1 << self.half_bits) - 1
        base = _mix64(_mix64(seed & _M64) ^ (epoch & _M64))
        self.keys = [_mix64(base + r) for r in range(self.ROUNDS)]

    def __call__(self, i: int) -> int:
        while True:
            left, right = i >> self.half_bits, i & self.half_mask
            for key in self.keys:
                left, right = right, left ^ (_mix64(right ^ key) & self.half_mask)
            i = (left << self.half_bits) | right
            if i < self.n:
                return i


class _Order:
    """The epoch order: global position -> (source, sample index)."""

    def __init__(self, sources: Sequence[Any], seed: int, shuffle: bool):
        self.counts = [repeat_count(len(s), s.repeat) for s in sources]
        self.offsets = [0]
        for c in self.counts:
            self.offsets.append(self.offsets[-1] + c)
        self.size = self.offsets[-1]
        self.lengths = [len(s) for s in sources]
        self.seed, self.shuffle = seed, shuffle
        self._perm: _Permutation | None = None
        self._perm_epoch = -1
        self.fingerprint = {  # checked in this order on resume: the sources first, as the most telling
            "sources": [[s.name, len(s), str(s.repeat)] for s in sources],
            "seed": seed, "shuffle": shuffle, "epoch_size": self.size,
        }

    def locate(self, epoch: int, position: int) -> tuple[int, int]:
        if self.shuffle:
            if self._perm is None or self._perm_epoch != epoch:
                self._perm, self._perm_epoch = _Permutation(self.size, self.seed, epoch), epoch
            position = self._perm(position)
        s = bisect_right(self.offsets, position) - 1
        # Entry k of a source's share is sample k mod len: floor(r) full passes, then the first frac(r) share.
        return s, (position - self.offsets[s]) % self.lengths[s]


# ---------------------------------------------------------------------------------------------------- readers


def _first_index(offset: int, stride: int, position: int) -> int:
    """The first stream index j whose position ``offset + stride * j`` is >= ``position``."""
    return max(0, -((offset - position) // stride))


class _Reader:
    """Everything a reader needs (picklable, sent to the workers)."""

    def __init__(self, sources, preprocess, order: _Order, *, rank, world_size, num_readers, micro_batch_size, packed,
                 max_seq_len, weighting, pad_id, image_size, pack_buffer):
        self.sources, self.preprocess, self.order = list(sources), preprocess, order
        self.rank, self.world_size, self.num_readers = rank, world_size, num_readers
        self.micro_batch_size, self.packed, self.max_seq_len = micro_batch_size, packed, max_seq_len
        self.weighting, self.pad_id, self.image_size, self.pack_buffer = weighting, pad_id, image_size, pack_buffer

    def offset(self, reader: int) -> int:
        return self.rank + self.world_size * reader

    @property
    def stride(self) -> int:
        return self.world_size * self.num_readers


class _Producer:
    """One reader's batches, starting from its saved state."""

    def __init__(self, cfg: _Reader, reader: int, state: dict[str, Any]):
        self.cfg, self.reader = cfg, reader
        self.offset, self.stride = cfg.offset(reader), cfg.stride
        self.epoch, self.next = int(state["epoch"]), int(state["next"])
        self.saved_open, self.saved_ready = state["open"], state["ready"]
        self.packer = Packer(cfg.max_seq_len, cfg.pack_buffer)
        self.counts: Counter[str] = Counter()  # since the previous batch
        self.records: list[dict[str, Any]] = []

    def batches(self) -> Iterator[Batch]:
        cfg = self.cfg
        # Samples that were buffered at the checkpoint are read again; they were counted as seen back then.
        ready = [p for p in (self._reread(keys) for keys in self.saved_ready) if p.items]
        self.packer.restore([p for p in (self._reread(keys) for keys in self.saved_open) if p.items])
        epoch_from_start, used_in_epoch = self.next == 0, 0
        while True:
            while len(ready) < cfg.micro_batch_size:
                position = self.offset + self.stride * self.next
                if position >= cfg.order.size:
                    if epoch_from_start and used_in_epoch == 0:
                        raise RuntimeError(
                            f"reader {self.reader} of rank {cfg.rank} got no usable sample in epoch {self.epoch}: "
                            f"every one of its {self.next} samples was skipped (see the skip log)"
                        )
                    ready.extend(self.packer.flush())
                    self.epoch, self.next, epoch_from_start, used_in_epoch = self.epoch + 1, 0, True, 0
                    continue
                key = [self.epoch, self.next]
                self.next += 1
                self.counts["seen"] += 1
                example = self._read(self.epoch, position)
                if example is None:
                    continue
                used_in_epoch += 1
                if cfg.packed:
                    ready.extend(self.packer.add(key, example))
                else:
                    ready.append(Pack([(key, example)], len(example)))
            rows, ready = ready[: cfg.micro_batch_size], ready[cfg.micro_batch_size :]
            batch = collate(
                [p.examples for p in rows], max_seq_len=cfg.max_seq_len, weighting=cfg.weighting, pad_id=cfg.pad_id,
                image_size=cfg.image_size,
            )
            self.counts["used"] += batch.num_samples
            batch.skips = dict(self.counts)
            batch.data_state = {
                "reader": self.reader,
                "state": {
                    "epoch": self.epoch, "next": self.next,
                    "open": [p.keys for p in self.packer.open], "ready": [p.keys for p in ready],
                },
                "epoch": max(key[0] for p in rows for key in p.keys),
                "skipped": self.records,
            }
            self.counts, self.records = Counter(), []
            yield batch

    def _reread(self, keys: list[list[int]]) -> Pack:
        pack = Pack()
        for epoch, j in keys:
            example = self._read(int(epoch), self.offset + self.stride * int(j))
            if example is None:
                continue  # it was read fine before the checkpoint, so the data changed since; counted as a skip
            pack.append([int(epoch), int(j)], example)
        return pack

    def _read(self, epoch: int, position: int) -> Example | None:
        cfg = self.cfg
        s, index = cfg.order.locate(epoch, position)
        source = cfg.sources[s]
        where = f"sample {index} of dataset {source.name!r} (epoch {epoch}, global position {position})"
        try:
            raw: RawSample = source.get(index)
        except SkipSample as skip:
            return self._skip(skip, source.name, epoch)
        except Exception as exc:
            raise SampleError(f"reading {where} failed: {type(exc).__name__}: {exc}") from exc
        raw.index = position
        try:
            return cfg.preprocess(raw, epoch)
        except SkipSample as skip:
            return self._skip(skip, raw.dataset, epoch)
        except Exception as exc:
            raise SampleError(f"preprocessing {raw.sample_id} ({where}) failed: {type(exc).__name__}: {exc}") from exc

    def _skip(self, skip: SkipSample, dataset: str, epoch: int) -> None:
        self.counts[skip.reason] += 1
        self.records.append({
            "sample_id": skip.sample_id, "dataset": dataset, "reason": skip.reason, "detail": skip.detail,
            "epoch": epoch, "rank": self.cfg.rank,
        })
        return None


class _ReaderDataset(IterableDataset):
    """Worker ``i`` of the DataLoader plays reader ``(i + first) % K``, so the round robin resumes mid-cycle."""

    def __init__(self, cfg: _Reader, states: list[dict[str, Any]], first: int):
        super().__init__()
        self.cfg, self.states, self.first = cfg, states, first

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        reader = (worker + self.first) % self.cfg.num_readers
        return _Producer(self.cfg, reader, self.states[reader]).batches()


def _identity(batch: Batch) -> Batch:
    return batch


# ---------------------------------------------------------------------------------------------------- loader


class TrainLoader:
    """This rank's infinite stream of :class:`Batch` (see the module docstring for order, skips and state).

    Args:
        sources: objects with ``name``, ``repeat``, ``__len__`` and ``get(i) -> RawSample`` (may raise
            :class:`SkipSample`).
        preprocess: ``preprocess(raw, epoch) -> Example`` (may raise :class:`SkipSample`); must be deterministic
            given ``raw.index`` and ``epoch``.
        rank, world_size: this rank and the number of data-parallel ranks.
        micro_batch_size: rows per batch (packs when ``packed``, samples otherwise).
        packed: pack several samples per row.
        max_seq_len: tokens per row at most.
        weighting: loss weighting (``token``, ``sample``, ``square``).
        pad_id: token id of padding.
        image_size: tile size S (for the dummy tile of an image-free batch).
        seed, shuffle: the order (see the module docstring).
        num_workers: dataloader worker processes (0: everything in this process).
        log_skips: skipped samples logged in full per reason (all are counted and written to ``skip_log``).
        skip_log: JSON-lines file of skipped samples (appended to), or None.
        logger: where skip and resume messages go (default: the ``evip.data`` logger).
        pack_buffer: open packs of the packer (a larger look-ahead packs fuller rows).
    """

    def __init__(
        self, sources: Sequence[Any], preprocess: Callable[[RawSample, int], Example], *, rank: int,
        world_size: int, micro_batch_size: int, packed: bool, max_seq_len: int, weighting: str, pad_id: int,
        image_size: int, seed: int, shuffle: bool = True, num_workers: int = 0, log_skips: int = 10,
        skip_log: Path | None = None, logger: Any = None, pack_buffer: int = 16,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if micro_batch_size < 1 or num_workers < 0 or max_seq_len < 1 or pack_buffer < 1:
            raise ValueError(
                f"need micro_batch_size >= 1, num_workers >= 0, max_seq_len >= 1, pack_buffer >= 1; got "
                f"{micro_batch_size}, {num_workers}, {max_seq_len}, {pack_buffer}"
            )
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
        self.order = _Order(sources, seed, shuffle)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.num_readers = max(1, num_workers)
        if self.order.size < world_size * self.num_readers:
            raise ValueError(
                f"an epoch of {self.order.size} samples "
                f"({', '.join(f'{s.name}: {c}' for s, c in zip(sources, self.order.counts))}) "
                f"cannot feed {world_size} ranks x {self.num_readers} readers; every reader needs a sample"
            )
        self.packed, self.micro_batch_size, self.max_seq_len, self.pack_buffer = (
            packed, micro_batch_size, max_seq_len, pack_buffer)
        self._cfg = _Reader(
            sources, preprocess, self.order, rank=rank, world_size=world_size, num_readers=self.num_readers,
            micro_batch_size=micro_batch_size, packed=packed, max_seq_len=max_seq_len, weighting=weighting,
            pad_id=pad_id, image_size=image_size, pack_buffer=pack_buffer,
        )
        self.log_skips = log_skips
        self.skip_log = Path(skip_log) if skip_log is not None else None
        self.logger = logger if logger is not None else logging.getLogger("evip.data")
        self.skips = SkipCounter()
        self.epoch = 0
        self._states = self._start_states((0, 0))
        self._next_reader = 0
        self._skip_log_bytes = self.skip_log.stat().st_size if self.skip_log and self.skip_log.exists() else 0
        self._rows = self._tokens = 0

    # ------------------------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[Batch]:
        """Batches from the current position on (each ``iter()`` continues where the last yielded batch left)."""
        if self.num_workers == 0:
            stream: Iterator[Batch] = _Producer(self._cfg, 0, self._states[0]).batches()
        else:
            dataset = _ReaderDataset(self._cfg, copy.deepcopy(self._states), self._next_reader)
            stream = iter(DataLoader(
                dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                persistent_workers=False, in_order=True,
            ))
        try:
            for batch in stream:
                self._consume(batch)
                yield batch
        except Exception as exc:
            # The DataLoader's frames in the traceback hold its iterator; clear them so that the workers stop now,
            # not when the exception is collected (a worker forked by a later loader would inherit the live
            # iterator). The workers' own tracebacks are already in the message.
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            del stream

    def _consume(self, batch: Batch) -> None:
        info = batch.data_state
        if info["reader"] != self._next_reader:
            raise RuntimeError(
                f"got a batch from reader {info['reader']} but reader {self._next_reader} was next: the DataLoader "
                "no longer yields its workers' batches in round robin, so the loader state cannot be tracked"
            )
        self._states[info["reader"]] = info["state"]
        self._next_reader = (info["reader"] + 1) % self.num_readers
        self._record_skips(info["skipped"])
        self.skips.update(batch.skips)
        self.epoch = max(self.epoch, info["epoch"])
        self._rows += batch.input_ids_BT.shape[0]
        self._tokens += batch.num_text_tokens + batch.num_visual_tokens

    def _record_skips(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        shown = Counter(self.skips.counts)
        for rec in records:
            shown[rec["reason"]] += 1
            if shown[rec["reason"]] <= self.log_skips:
                last = " (further ones are only counted)" if shown[rec["reason"]] == self.log_skips else ""
                self.logger.warning(
                    "skipped %s (dataset %s, rank %d, epoch %d): %s: %s%s", rec["sample_id"], rec["dataset"],
                    rec["rank"], rec["epoch"], rec["reason"], rec["detail"], last,
                )
        if self.skip_log is not None:
            self.skip_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.skip_log, "a") as f:
                f.write("".join(json.dumps(rec) + "\n" for rec in records))
                self._skip_log_bytes = f.tell()

    @property
    def fill_ratio(self) -> float:
        """Non-padding tokens over ``rows * max_seq_len`` of the batches yielded so far."""
        return self._tokens / (self._rows * self.max_seq_len) if self._rows else 0.0

    # ------------------------------------------------------------------------------------------- state

    def _layout(self) -> dict[str, Any]:
        return {
            "rank": self.rank, "world_size": self.world_size, "num_readers": self.num_readers, "packed": self.packed,
            "micro_batch_size": self.micro_batch_size, "max_seq_len": self.max_seq_len,
            "pack_buffer": self.pack_buffer,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position after the last batch yielded (see the module docstring)."""
        return {
            "version": STATE_VERSION, **self._layout(), "order": self.order.fingerprint,
            "readers": copy.deepcopy(self._states), "next_reader": self._next_reader,
            "skips": self.skips.state_dict(), "epoch": self.epoch, "skip_log_bytes": self._skip_log_bytes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: exactly when it has this loader's layout, else at the safe position.

        A state of another world size must go through :func:`merge_states` first.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        for key, value in self.order.fingerprint.items():
            if state["order"].get(key) != value:
                raise ValueError(
                    f"the data order changed since the checkpoint: {key} was {state['order'].get(key)!r}, now "
                    f"{value!r}; resuming would not continue the same sample sequence"
                )
        if state["world_size"] != self.world_size or state["rank"] != self.rank:
            raise ValueError(
                f"loader state of rank {state['rank']} of {state['world_size']} given to rank {self.rank} of "
                f"{self.world_size}; for another world size pass every rank's state through merge_states()"
            )
        if "start" in state:  # from merge_states
            start = (int(state["start"][0]), int(state["start"][1]))
            self._states, self._next_reader = self._start_states(start), 0
            self.logger.warning(
                "data: resuming on %d ranks at epoch %d global position %d (saved by another world size); up to %d "
                "samples already used are read again", self.world_size, start[0], start[1], state.get("repeated", 0),
            )
        elif state["readers"] and self._layout() == {k: state[k] for k in self._layout()}:
            self._states, self._next_reader = copy.deepcopy(state["readers"]), int(state["next_reader"])
            self._truncate_skip_log(int(state["skip_log_bytes"]))
        else:
            start, repeated = _safe_start([state])
            self._states, self._next_reader = self._start_states(start), 0
            self.logger.warning(
                "data: the reader layout changed since the checkpoint (%s); rank %d resumes at epoch %d global "
                "position %d and reads up to %d samples again", _layout_change(state, self._layout()), self.rank,
                start[0], start[1], repeated,
            )
        self.skips.load_state_dict(state["skips"])
        self.epoch = int(state["epoch"])

    def _start_states(self, start: tuple[int, int]) -> list[dict[str, Any]]:
        """Reader states that begin at the first of each reader's positions at or after ``start``."""
        epoch, position = start
        stride = self._cfg.stride
        return [
            {"epoch": epoch, "next": _first_index(self._cfg.offset(k), stride, position), "open": [], "ready": []}
            for k in range(self.num_readers)
        ]

    def _truncate_skip_log(self, size: int) -> None:
        # Lines past the checkpoint's size were written for batches after it, which the resumed run redoes.
        self._skip_log_bytes = size
        if self.skip_log is not None and self.skip_log.exists() and self.skip_log.stat().st_size > size:
            with open(self.skip_log, "r+b") as f:
                f.truncate(size)


# ---------------------------------------------------------------------------------------------------- topology


def _safe_start(states: list[dict[str, Any]]) -> tuple[tuple[int, int], int]:
    """The first ``(epoch, global position)`` some reader of ``states`` had not finished, and how many samples at
    or after it were already read (they will be read again)."""
    readers = []
    for st in states:
        world, rank, num_readers = st["world_size"], st["rank"], st["num_readers"]
        for k, rs in enumerate(st["readers"]):
            offset, stride = rank + world * k, world * num_readers
            pending = [(int(e), int(j)) for pack in rs["open"] + rs["ready"] for e, j in pack]
            firsts = [(e, offset + stride * j) for e, j in pending]
            firsts.append((int(rs["epoch"]), offset + stride * int(rs["next"])))
            readers.append((offset, stride, (int(rs["epoch"]), int(rs["next"])), len(pending), min(firsts)))
    start = min(r[-1] for r in readers)
    size = states[0]["order"]["epoch_size"]
    repeated = 0
    for offset, stride, (cur_epoch, cur_next), num_pending, _ in readers:
        per_epoch = _first_index(offset, stride, size)
        first = min(_first_index(offset, stride, start[1]), per_epoch)
        if cur_epoch == start[0]:
            done = max(0, min(cur_next, per_epoch) - first)
        else:
            done = (per_epoch - first) + (cur_epoch - start[0] - 1) * per_epoch + min(cur_next, per_epoch)
        repeated += done - num_pending
    return start, repeated


def _layout_change(state: dict[str, Any], layout: dict[str, Any]) -> str:
    return ", ".join(f"{k} {state[k]} -> {v}" for k, v in layout.items() if state[k] != v) or "no reader state"


def merge_states(states: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """Per-rank loader states for ``world_size`` ranks from the states all ranks of a run saved (index = rank).

    The same world size returns the states unchanged (exact resume). Another one restarts every new rank at the
    global safe position (see :func:`_safe_start`): no sample is skipped, and the samples some old rank had
    already read past it (returned as ``repeated`` in each state, and logged on load) are used again. The old
    ranks' skip counts are summed into new rank 0, so totals over ranks stay right (the re-read span may add a
    few duplicates).
    """
    if not states:
        raise ValueError("merge_states needs the saved state of every rank, got none")
    old_world = states[0]["world_size"]
    ranks = [st["rank"] for st in states]
    if len(states) != old_world or ranks != list(range(old_world)):
        raise ValueError(
            f"merge_states needs the states of all {old_world} ranks in rank order, got ranks {ranks}; a missing "
            "rank's position is unknown, so a safe restart position cannot be computed"
        )
    for st in states[1:]:
        if st["order"] != states[0]["order"]:
            raise ValueError(
                f"rank {st['rank']} saved another data order than rank 0: {st['order']} vs {states[0]['order']}"
            )
    if world_size == old_world:
        return copy.deepcopy(states)
    if all("start" in st for st in states):  # merged before and not advanced since
        start, repeated = tuple(states[0]["start"]), states[0].get("repeated", 0)
    else:
        start, repeated = _safe_start(states)
    total = SkipCounter()
    for st in states:
        total.update(st["skips"])
    return [
        {
            "version": STATE_VERSION, "rank": r, "world_size": world_size, "order": copy.deepcopy(states[0]["order"]),
            "start": list(start), "repeated": repeated, "skips": total.state_dict() if r == 0 else {},
            "epoch": int(start[0]), "skip_log_bytes": 0,
        }
        for r in range(world_size)
    ]
