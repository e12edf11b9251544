"""What a training run reports: model FLOPs and MFU, the per-window meter, metric sinks and the progress bar.

Legend: D decoder width, F FFN width, V vocabulary, H query heads, K kv heads, Dh head dim, T decoder tokens,
L one attention block (a sample of a pack), Cv patch width, C image channels, P patch side, G = S / P patch grid,
Q visual tokens per tile, R^2 = 1 / downsample_ratio^2 (pixel-shuffle fan-in).

Pieces, as the trainer uses them:

- :func:`model_flops` counts the FLOPs of one micro-batch (a :class:`FlopCount`, by part); :func:`peak_flops`
  gives a device's dense bf16 peak for MFU.
- :class:`StepMeter` accumulates one logging window (tokens, samples, FLOPs, losses, time waiting for data) and
  :meth:`StepMeter.report` turns it into the metrics dict for the sinks and ONE line for rank 0.
- :class:`MetricSink` is the logger interface: :class:`NullSink`, :class:`TensorBoardSink`, :class:`WandbSink`,
  combined by :func:`build_sinks` (non-zero ranks get a :class:`NullSink`).
- :class:`Progress` is a tqdm bar on rank 0 when a person watches; every line goes through
  :meth:`Progress.write` so lines and the bar do not interleave.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, TextIO

import torch

from mono.configuration import MonoInternVLConfig

from .job import LoggingConfig
from .stages import PARAM_GROUPS

__all__ = [
    "CompositeSink", "FlopCount", "MetricSink", "NullSink", "Progress", "Report", "StepMeter", "TensorBoardSink",
    "WandbSink", "build_sinks", "ffn_flops", "format_count", "format_duration", "model_flops", "peak_flops",
    "peak_flops_for_name", "peak_memory_bytes",
]

GIB = float(1 << 30)


# ============================================================================================== FLOPs
@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one micro-batch by part (forward, plus backward when counted); add counts with ``+``.

    ``ffn`` is the routed FFN alone (one SwiGLU expert per token); ``ffn_share`` is its part of ``total``.
    """

    patch_embed: float = 0.0
    projector: float = 0.0
    attention_proj: float = 0.0
    """``wqkv`` and ``wo`` of every layer (visual attention experts included: also one per token)."""
    attention_core: float = 0.0
    """Scores ``q k^T`` and the weighted sum of values."""
    ffn: float = 0.0
    lm_head: float = 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def ffn_share(self) -> float:
        return self.ffn / self.total if self.total else 0.0

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


def model_flops(
    config: MonoInternVLConfig,
    *,
    num_text_tokens: int,
    num_visual_tokens: int,
    seq_lens: Collection[int],
    num_tiles: Optional[int] = None,
    trainable: Optional[Collection[str]] = None,
    backward: bool = True,
    causal: bool = True,
    num_logit_tokens: Optional[int] = None,
) -> FlopCount:
    """Model FLOPs of one micro-batch: 2 FLOPs per multiply-add of every matmul, nothing for element-wise work.

    Counted per forward, per token of the decoder (T = text + visual tokens):

    - patch embedding: ``2 * tiles * G^2 * (C P^2) * Cv`` (the conv as a matmul); projector ``mlp1``:
      ``2 * tiles * Q * (R^2 Cv * D + D * D)``;
    - per layer: ``wqkv`` ``2 T D (H + 2K) Dh`` and ``wo`` ``2 T (H Dh) D``; the routed FFN ``3 * 2 T D F``: each
      token pays ONE expert (text or visual), which is what routing buys over running both experts on every
      token; attention core ``4 H Dh * pairs``, where a block of L tokens has ``L (L + 1) / 2`` query-key pairs
      when ``causal`` (what a causal flash kernel computes) and ``L^2`` otherwise (torchtitan's
      ``12 * layers * H * Dh * L`` per token is this non-causal term times 3);
    - LM head ``2 N D V`` for the N positions that get logits (every position unless ``num_logit_tokens`` says
      fewer: the trainer computes logits only where a target is).

    Backward: with ``trainable=None`` it is the convention MFU figures use (PaLM, torchtitan): twice the forward
    for every part, so training = 3 x forward; use it for MFU so numbers compare across stages and codebases.
    With ``trainable`` (parameter groups of :data:`evip.stages.PARAM_GROUPS`) it is the backward that actually
    runs: a matmul costs its forward once more for the input gradient when its input depends on a trainable
    parameter, and once more for the weight gradient of the tokens whose weight trains (frozen layers cost
    nothing, nor do frozen experts on the triton backend and the torch backend's slice path; pixels never get a
    gradient). Checked against ``FlopCounterMode`` op by op in ``tests/evip/test_metrics.py``. Recomputation (activation checkpointing, a flash
    kernel's score recompute) is never counted: these are model FLOPs, not hardware FLOPs.

    Args:
        config: the model's configuration.
        num_text_tokens, num_visual_tokens: decoder tokens by modality. Count useful work: leave padding out.
        seq_lens: lengths of the attention blocks (the samples of a pack, or one per unpacked row); they must
            add up to ``num_text_tokens + num_visual_tokens``.
        num_tiles: tiles through the patch embedding (default ``num_visual_tokens / Q``; pass more to count
            dummy tiles as work).
        trainable: ``None`` for the 3x convention, else the trained parameter groups.
        backward: count the backward pass (training); ``False`` gives the forward only.
        causal: count causal attention pairs (``False``: the full ``L^2``).
        num_logit_tokens: positions that get logits (default: all ``T``).

    Raises:
        ValueError: negative counts, lengths that do not add up, too few tiles, unknown parameter groups.
    """
    llm, vis = config.llm_config, config.vision_config
    d, f, v = llm.hidden_size, llm.intermediate_size, llm.vocab_size
    h, k, dh, layers = llm.num_attention_heads, llm.num_key_value_heads, llm.head_dim, llm.num_hidden_layers
    q = config.tokens_per_tile
    lens = [int(n) for n in seq_lens]
    n_txt, n_vis = int(num_text_tokens), int(num_visual_tokens)
    if n_txt < 0 or n_vis < 0 or any(n <= 0 for n in lens):
        raise ValueError(f"token counts must be >= 0 and seq_lens > 0; got text {n_txt}, visual {n_vis}, {lens}")
    n_logits = n_txt + n_vis if num_logit_tokens is None else int(num_logit_tokens)
    if not 0 <= n_logits <= n_txt + n_vis:
        raise ValueError(f"num_logit_tokens must be in 0..{n_txt + n_vis} (the decoder tokens), got {n_logits}")
    if sum(lens) != n_txt + n_vis:
        raise ValueError(
            f"seq_lens add up to {sum(lens)} tokens but text {n_txt} + visual {n_vis} = {n_txt + n_vis}; pass the "
            "lengths of the samples the decoder attended over (padding excluded from both)"
        )
    tiles = -(-n_vis // q) if num_tiles is None else int(num_tiles)
    if tiles * q < n_vis:
        raise ValueError(f"{tiles} tiles give at most {tiles * q} visual tokens, fewer than {n_vis}")
    groups = None if trainable is None else set(trainable)
    if groups is not None and not groups <= set(PARAM_GROUPS):
        raise ValueError(f"unknown parameter group(s) {sorted(groups - set(PARAM_GROUPS))}; the groups are "
                         f"{', '.join(PARAM_GROUPS)}")
    n_tok = n_txt + n_vis
    grid = config.image_size // vis.patch_size
    fan_in = round(1 / config.downsample_ratio) ** 2 * vis.hidden_size
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lens)
    qkv_out = (h + 2 * k) * dh

    def mm(rows: int, n_in: int, n_out: int) -> float:
        return 2.0 * rows * n_in * n_out

    # Forward FLOPs of each part (per layer where it repeats).
    fwd = dict(
        patch=mm(tiles * grid * grid, vis.num_channels * vis.patch_size**2, vis.hidden_size),
        proj1=mm(tiles * q, fan_in, d), proj2=mm(tiles * q, d, d),
        qkv=mm(n_tok, d, qkv_out), wo=mm(n_tok, h * dh, d), core=4.0 * h * dh * pairs,
        w13=2 * mm(n_tok, d, f), w2=mm(n_tok, f, d), head=mm(n_logits, d, v),
    )
    if groups is None or not backward:
        factor = 3.0 if backward else 1.0
        return FlopCount(
            patch_embed=factor * fwd["patch"], projector=factor * (fwd["proj1"] + fwd["proj2"]),
            attention_proj=factor * layers * (fwd["qkv"] + fwd["wo"]), attention_core=factor * layers * fwd["core"],
            ffn=factor * layers * (fwd["w13"] + fwd["w2"]), lm_head=factor * fwd["head"],
        )
    return _exact_training_flops(config, fwd, groups, n_txt, n_vis, tiles, layers)


def _exact_training_flops(config, fwd, groups, n_txt, n_vis, tiles, layers) -> FlopCount:
    """Forward + the backward autograd runs with only ``groups`` trainable (see :func:`model_flops`).

    Walks the forward in order, tracking whether the activation stream depends on a trainable parameter (then
    every matmul on it needs an input gradient). Token classes matter only for weights: a routed expert's
    weight gradient covers its own tokens, and inside the routed FFN a class whose input needs no gradient and
    whose gate/up weights are frozen needs no input gradient through ``w2`` (the per-expert slices are separate
    autograd nodes).
    """
    d, f = config.llm_config.hidden_size, config.llm_config.intermediate_size
    h, k, dh = config.llm_config.num_attention_heads, config.llm_config.num_key_value_heads, config.llm_config.head_dim
    qkv_out = (h + 2 * k) * dh
    n_tok = n_txt + n_vis
    train = {g: g in groups for g in PARAM_GROUPS}
    norms = train["norms"]
    # Which group trains the visual tokens' attention projections: their own experts when the model has them.
    vis_attn = train["visual_experts"] if config.llm_config.visual_attention_experts else train["attention"]

    # Vision: pixels never need a gradient, so the conv pays only its weight gradient.
    patch = fwd["patch"] * (1 + train["patch_embed"])
    up_vis = train["patch_embed"]
    ln_up = up_vis or train["projector"]  # the projector's LayerNorm weight belongs to the projector
    projector = fwd["proj1"] * (1 + ln_up + train["projector"]) + fwd["proj2"] * (1 + ln_up + train["projector"])
    up_vis = ln_up or train["projector"]
    up = train["embeddings"] or (up_vis and tiles > 0)  # masked_scatter joins both modalities in one tensor

    def weight_grad(rows_txt_trains: bool, rows_vis_trains: bool, n_in: int, n_out: int) -> float:
        return 2.0 * n_in * n_out * (n_txt * rows_txt_trains + n_vis * rows_vis_trains)

    attn_proj = core = ffn = 0.0
    for _ in range(layers):
        x_up = up or norms  # attention_norm
        attn_proj += fwd["qkv"] * (1 + x_up) + weight_grad(train["attention"], vis_attn, d, qkv_out)
        qkv_up = x_up or (train["attention"] and n_txt > 0) or (vis_attn and n_vis > 0)
        core += fwd["core"] * (1 + 2 * qkv_up)
        attn_proj += fwd["wo"] * (1 + qkv_up) + weight_grad(train["attention"], vis_attn, h * dh, d)
        up = up or qkv_up
        x_up = up or norms  # ffn_norm
        ffn += fwd["w13"] * (1 + x_up) + 2 * weight_grad(train["text_ffn"], train["visual_experts"], d, f)
        hid_txt, hid_vis = x_up or train["text_ffn"], x_up or train["visual_experts"]
        ffn += fwd["w2"] + 2.0 * f * d * (n_txt * hid_txt + n_vis * hid_vis)
        ffn += weight_grad(train["text_ffn"], train["visual_experts"], f, d)
        up = up or (hid_txt and n_txt > 0) or (hid_vis and n_vis > 0)
    head = fwd["head"] * (1 + (up or norms) + train["lm_head"])  # final norm, then the head
    return FlopCount(patch_embed=patch, projector=projector, attention_proj=attn_proj, attention_core=core,
                     ffn=ffn, lm_head=head)


def ffn_flops(config: MonoInternVLConfig, num_tokens: int, *, backward: bool = True) -> float:
    """FLOPs of the routed FFN over ``num_tokens`` decoder tokens, all layers: ``3 * 2 * T * D * F`` per layer
    (one expert per token), times 3 for training (the convention of :func:`model_flops` with ``trainable=None``)."""
    llm = config.llm_config
    return 6.0 * num_tokens * llm.hidden_size * llm.intermediate_size * llm.num_hidden_layers * (3 if backward else 1)


# Dense (no 2:4 sparsity) bf16 tensor-core peaks from the vendors' data sheets, in FLOP/s. The first name found
# in the device name wins, so the variants come before their family.
_PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM, and GH200
    ("A100", 312e12),
    ("L40S", 362e12),
    ("RTX 4090", 165e12),  # with fp32 accumulation, as PyTorch's bf16 matmuls use
)


def peak_flops_for_name(name: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of a GPU by its ``torch.cuda.get_device_name``, or None when not in the table."""
    lowered = name.lower()
    for key, flops in _PEAK_BF16:
        if key.lower() in lowered:
            return flops
    return None


def peak_flops(device: torch.device | str | int | None, override_tflops: Optional[float] = None) -> Optional[float]:
    """Peak dense bf16 FLOP/s of one device for MFU: ``override_tflops`` (``LoggingConfig.peak_tflops``) when
    set, else looked up from the GPU name; None on CPU and for GPUs not in the table (MFU is then not shown)."""
    if override_tflops is not None:
        if not override_tflops > 0:
            raise ValueError(f"logging.peak_tflops must be positive, got {override_tflops}")
        return float(override_tflops) * 1e12
    if device is None:
        return None
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(dev))


def peak_memory_bytes(device: torch.device | str | None) -> tuple[float, Optional[float]]:
    """Peak memory of the run so far: ``(allocated, reserved)`` by the CUDA caching allocator on a CUDA device;
    on CPU the process's maximum resident set size and None."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return float(torch.cuda.max_memory_allocated(dev)), float(torch.cuda.max_memory_reserved(dev))
    try:
        import resource
    except ImportError:  # not on POSIX
        return float("nan"), None
    rss = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return (rss if sys.platform == "darwin" else rss * 1024.0), None  # bytes on macOS, KiB on Linux


# ============================================================================================== formatting
def format_count(n: float) -> str:
    """``950``, ``1.2k``, ``3.4M``, ``5.6B``, ``7.8T`` (three significant digits below a thousand)."""
    if not math.isfinite(n):
        return str(n)
    # Below a thousand unless three significant digits round it up to one (999.96 would print "1e+03").
    if abs(n) < 1000 and abs(float(f"{n:.3g}")) < 1000:
        return f"{n:.3g}"
    for unit, scale in (("k", 1e3), ("M", 1e6), ("B", 1e9), ("T", 1e12)):
        value = n / scale
        if round(abs(value), 1) < 1000 or unit == "T":
            return f"{value:.1f}{unit}"
    raise AssertionError("unreachable")


def format_duration(seconds: Optional[float]) -> str:
    """``42s``, ``12m05s``, ``1h02m``, ``2d03h``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# ============================================================================================== step meter
@dataclass
class Report:
    """One logging window: ``metrics`` for the sinks (same on every rank) and ``line`` for rank 0's log."""

    step: int
    metrics: dict[str, float]
    line: str


def _gather_all(payload: dict) -> list[dict]:
    """Every rank's payload (one ``all_gather_object`` per report), or just ours without a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, payload)
        return out
    return [payload]


class StepMeter:
    """Accumulates one logging window per rank and reports it for all ranks.

    Per micro-batch the trainer calls :meth:`add_batch`, wraps its wait for the next batch in
    :meth:`data_wait`, and after each optimizer step calls :meth:`end_step`. :meth:`report` is a collective
    (every rank calls it at the same steps): token, sample, FLOP and skip counts are summed over ranks, time,
    data wait and ETA take the slowest rank, peak memory the largest. The first window starts when the meter is
    made, so make it just before the training loop.

    Throughput is reported globally (``tokens_per_s/*``: all ranks) and per device (``tokens_per_s_device/*``,
    as torchtitan does); the line shows per device (``tok/s/dev``), like ``tflops_per_device`` and ``mfu``.
    ``mfu`` is the whole model's FLOPs over the peak (FLOPs as given to :meth:`add_batch`; use
    :func:`model_flops` with ``trainable=None`` for the conventional figure); ``mfu/ffn`` and
    ``flops/ffn_share`` isolate the routed FFN. Shares and MFU are fractions; the line prints percents.

    Args:
        total_steps: optimizer steps of the run (for ``step a/b`` and the ETA).
        peak_flops: one device's peak FLOP/s (:func:`peak_flops`); None: no MFU.
        device: where peak memory is read (CUDA allocator; CPU: the process's max RSS).
        gather: ``payload -> [payload of every rank]``; default ``all_gather_object`` when a process group
            with more than one rank is initialised.
        clock: seconds, monotonic (injected by tests).
    """

    def __init__(
        self,
        *,
        total_steps: int,
        peak_flops: Optional[float] = None,
        device: torch.device | str | None = None,
        gather: Optional[Callable[[dict], list[dict]]] = None,
        clock: Callable[[], float] = time.perf_counter,
        nonfinite_steps: int = 0,
    ) -> None:
        self.total_steps = int(total_steps)
        self.peak_flops = peak_flops
        self.device = device
        self._gather = gather or _gather_all
        self._clock = clock
        self._first_end: Optional[float] = None  # end of this process's first step (warm-up, compilation)
        self._last_end: Optional[float] = None
        self._steps_run = 0
        self._step = 0
        self._skipped: dict[str, int] = {}
        self._nonfinite = int(nonfinite_steps)  # a resumed run starts from its checkpoint's count
        self._lr = float("nan")
        self._grad_norm = float("nan")
        self._reset_window()

    def _reset_window(self) -> None:
        self._w = dict(time0=self._clock(), data_wait=0.0, steps=0, text=0, visual=0, samples=0, flops=0.0,
                       ffn_flops=0.0, loss_sum=0.0, loss_weight=0.0)

    @contextmanager
    def data_wait(self) -> Iterator[None]:
        """Time spent inside counts as waiting for data (wrap ``next(loader)``)."""
        start = self._clock()
        try:
            yield
        finally:
            self._w["data_wait"] += self._clock() - start

    def add_batch(self, *, text_tokens: int, visual_tokens: int, samples: int, flops: FlopCount | float = 0.0) -> None:
        """One micro-batch of this rank: its non-padding tokens by modality, samples and model FLOPs."""
        self._w["text"] += int(text_tokens)
        self._w["visual"] += int(visual_tokens)
        self._w["samples"] += int(samples)
        if isinstance(flops, FlopCount):
            self._w["flops"] += flops.total
            self._w["ffn_flops"] += flops.ffn
        else:
            self._w["flops"] += float(flops)

    def end_step(
        self,
        step: int,
        *,
        loss: float,
        lr: float,
        grad_norm: float,
        loss_weight: float = 1.0,
        nonfinite: bool = False,
        skipped: Optional[Mapping[str, int]] = None,
    ) -> None:
        """One optimizer step done (``step`` counts from 1).

        ``loss`` enters the window's mean with ``loss_weight`` (e.g. its supervised tokens); a ``nonfinite``
        step (skipped by the trainer) is counted instead and its loss and grad norm are left out. ``skipped``
        is this rank's cumulative count of skipped samples per reason (skip reasons only), as of now.
        """
        now = self._clock()
        if self._first_end is None:
            self._first_end = now
        self._last_end = now
        self._steps_run += 1
        self._step = int(step)
        self._w["steps"] += 1
        self._lr = float(lr)
        if nonfinite:
            self._nonfinite += 1
        else:
            self._w["loss_sum"] += float(loss) * float(loss_weight)
            self._w["loss_weight"] += float(loss_weight)
            self._grad_norm = float(grad_norm)
        if skipped is not None:
            self._skipped = {str(k): int(n) for k, n in skipped.items()}

    @property
    def eta_seconds(self) -> Optional[float]:
        """Remaining steps times the mean step time of this process so far, the first step left out (it holds
        warm-up and compilation); None before the second step."""
        if self._steps_run < 2 or self._first_end is None or self._last_end is None:
            return None
        mean = (self._last_end - self._first_end) / (self._steps_run - 1)
        return mean * max(0, self.total_steps - self._step)

    def report(self) -> Report:
        """Close the window (collective): metrics over all ranks and rank 0's line; the next window starts now."""
        w = self._w
        if w["steps"] == 0:
            raise RuntimeError("StepMeter.report() with no end_step() since the last report; report after a step")
        mem, reserved = peak_memory_bytes(self.device)
        payload = dict(w, time=self._clock() - w["time0"], mem=mem, reserved=reserved, skipped=self._skipped,
                       nonfinite=self._nonfinite, lr=self._lr, grad_norm=self._grad_norm, eta=self.eta_seconds)
        ranks = self._gather(payload)
        self._reset_window()
        return self._combine(ranks)

    def _combine(self, ranks: list[dict]) -> Report:
        world = len(ranks)
        elapsed = max(max(r["time"] for r in ranks), 1e-9)
        steps = ranks[0]["steps"]
        total = {key: sum(r[key] for r in ranks) for key in ("text", "visual", "samples", "flops", "ffn_flops",
                                                               "loss_sum", "loss_weight")}
        skipped: dict[str, int] = {}
        for r in ranks:
            for reason, n in r["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        loss = total["loss_sum"] / total["loss_weight"] if total["loss_weight"] else float("nan")
        flops_dev = total["flops"] / world / elapsed
        m: dict[str, float] = {
            "loss": loss, "lr": ranks[0]["lr"], "grad_norm": ranks[0]["grad_norm"],  # the same on every rank
            "tokens_per_s/text": total["text"] / elapsed, "tokens_per_s/visual": total["visual"] / elapsed,
            "tokens_per_s_device/text": total["text"] / elapsed / world,
            "tokens_per_s_device/visual": total["visual"] / elapsed / world,
            "samples_per_s": total["samples"] / elapsed,
            "tflops_per_device": flops_dev / 1e12,
            "data_wait_share": max(r["data_wait"] / max(r["time"], 1e-9) for r in ranks),
            "time/step_s": elapsed / steps,
            "mem/peak_gib": max(r["mem"] for r in ranks) / GIB,
            "nonfinite_steps": float(max(r["nonfinite"] for r in ranks)),  # a step-level event: the same on all
            "skipped/total": float(sum(skipped.values())),
        }
        if total["flops"]:
            m["flops/ffn_share"] = total["ffn_flops"] / total["flops"]
        if self.peak_flops:
            m["mfu"] = flops_dev / self.peak_flops
            m["mfu/ffn"] = total["ffn_flops"] / world / elapsed / self.peak_flops
        reserved = [r["reserved"] for r in ranks if r["reserved"] is not None]
        if reserved:
            m["mem/peak_reserved_gib"] = max(reserved) / GIB
        for reason, n in sorted(skipped.items()):
            m[f"skipped/{reason}"] = float(n)
        etas = [r["eta"] for r in ranks if r["eta"] is not None]
        if etas:
            m["eta_s"] = max(etas)  # the slowest rank sets the pace
        return Report(step=self._step, metrics=m, line=self._line(m, skipped))

    def _line(self, m: dict[str, float], skipped: dict[str, int]) -> str:
        parts = [
            f"step {self._step}/{self.total_steps}",
            f"loss {m['loss']:.4f}",
            f"lr {m['lr']:.1e}",
            f"gnorm {m['grad_norm']:.3g}",
            f"tok/s/dev text {format_count(m['tokens_per_s_device/text'])} "
            f"vis {format_count(m['tokens_per_s_device/visual'])}",
            f"mfu {100 * m['mfu']:.1f}%" if "mfu" in m else f"tflops/dev {m['tflops_per_device']:.3g}",
            f"data {100 * m['data_wait_share']:.0f}%",
            f"mem {m['mem/peak_gib']:.1f} GiB",
            f"eta {format_duration(m.get('eta_s'))}",
        ]
        total_skipped = sum(skipped.values())
        if total_skipped:
            detail = ", ".join(f"{k} {n}" for k, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])) if n)
            parts.append(f"skipped {total_skipped} ({detail})")
        if m["nonfinite_steps"]:
            parts.append(f"nonfinite {int(m['nonfinite_steps'])}")
        return " | ".join(parts)


# ============================================================================================== sinks
class MetricSink:
    """Where metric dicts go. Subclasses implement :meth:`log` and, if they hold resources, :meth:`close`."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release; the default holds nothing."""

    def __enter__(self) -> "MetricSink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullSink(MetricSink):
    """Drops everything (non-zero ranks, or nothing configured)."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        pass


class CompositeSink(MetricSink):
    """Sends every dict to each of ``sinks``, in order."""

    def __init__(self, sinks: list[MetricSink]) -> None:
        self.sinks = list(sinks)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class TensorBoardSink(MetricSink):
    """Scalars to TensorBoard event files under ``log_dir`` (the run config once, as text)."""

    def __init__(self, log_dir: Path | str, config: Optional[Mapping[str, Any]] = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "TensorBoard logging is on (logging.tensorboard: true) but the `tensorboard` package is not "
                "installed: `pip install tensorboard` (or the project's `train` extra), or set "
                "logging.tensorboard=false"
            ) from err
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        if config is not None:
            import json

            self._writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, float(value), step)
        self._writer.flush()  # once per logging window: cheap, and a crash loses nothing

    def close(self) -> None:
        self._writer.close()


class WandbSink(MetricSink):
    """Weights & Biases run ``run_name`` in ``project``; ``wandb`` is imported only when this is built."""

    def __init__(self, project: str, run_name: str, config: Mapping[str, Any], dir: Optional[Path | str] = None):
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                f"logging.wandb_project is {project!r} but the `wandb` package is not installed: "
                "`pip install wandb`, or leave logging.wandb_project unset"
            ) from err
        self._run = wandb.init(project=project, name=run_name, config=dict(config),
                               dir=str(dir) if dir is not None else None)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


def build_sinks(cfg: LoggingConfig, output_dir: Path | str, rank: int, run_config: Mapping[str, Any]) -> MetricSink:
    """The run's sinks: TensorBoard under ``<output_dir>/tb`` when ``cfg.tensorboard``, wandb when
    ``cfg.wandb_project`` is set (run named after the folder); a :class:`NullSink` on ranks other than 0."""
    if rank != 0:
        return NullSink()
    out = Path(output_dir)
    sinks: list[MetricSink] = []
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(out / "tb", run_config))
    if cfg.wandb_project:
        sinks.append(WandbSink(cfg.wandb_project, out.name, run_config, dir=out))
    if not sinks:
        return NullSink()
    return sinks[0] if len(sinks) == 1 else CompositeSink(sinks)


# ============================================================================================== progress
class Progress:
    """A tqdm bar of optimizer steps (with the loss) on rank 0 when ``mode`` is ``on``, or ``auto`` and
    ``file`` (stderr) is a terminal; otherwise no bar. Lines go through :meth:`write` so they print above an
    active bar instead of through it; lines of other ranks are dropped (rank 0 speaks for the run).
    """

    def __init__(self, total: int, *, initial: int = 0, mode: str = "auto", rank: int = 0, desc: str = "train",
                 file: Optional[TextIO] = None) -> None:
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"logging.progress must be 'auto', 'on' or 'off', got {mode!r}")
        self.rank = rank
        stream = file if file is not None else sys.stderr
        isatty = getattr(stream, "isatty", lambda: False)
        self.enabled = rank == 0 and (mode == "on" or (mode == "auto" and bool(isatty())))
        self._bar = None
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError as err:
                raise ImportError(
                    "a progress bar was asked for (logging.progress) but `tqdm` is not installed: `pip install "
                    "tqdm` (or the project's `train` extra), or set logging.progress=off"
                ) from err
            self._tqdm = tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=stream, dynamic_ncols=True)

    def update(self, step: int, loss: Optional[float] = None) -> None:
        """Move the bar to ``step`` (absolute, so a resumed run starts where it left off)."""
        if self._bar is None:
            return
        if loss is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
        self._bar.update(step - self._bar.n)

    def write(self, line: str) -> None:
        """Print one line to stdout on rank 0 (above the bar when there is one)."""
        if self.rank != 0:
            return
        if self._bar is not None:
            self._tqdm.write(line, file=sys.stdout)
        else:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
