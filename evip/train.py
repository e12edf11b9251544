"""Train one stage: ``evip train stage.yaml`` (under ``torchrun`` for several processes or nodes).

One optimizer step on each rank:

1. take ``grad_accum`` micro-batches from the loader (the time spent waiting is the *data wait*);
2. all-reduce the sum of their loss weights over the ranks: the step's denominator, so the loss of a sample
   does not depend on how the global batch was split across ranks and micro-batches (:mod:`evip.loss`);
3. forward + backward each micro-batch (``loss_sum * world_size / denominator``: FSDP averages gradients; with
   ``parallel.fsdp: false`` on several ranks each rank holds a whole copy and one flat all-reduce averages them);
4. all-reduce the loss; clip the global gradient norm; if the loss or the norm is not finite, the update is
   skipped and counted, and ``schedule.max_nonfinite`` skipped steps in a row abort the run;
5. AdamW (frozen parameters are not in it), then the cosine schedule.

Around it: the model is built for the stage (:mod:`evip.build`) with its trainable groups
(:mod:`evip.stages`), sharded with FSDP2 (``fully_shard`` per decoder layer, then the root) when more than one
rank runs, checkpointed with DCP every ``checkpoint.every`` steps and at the end (model, optimizer, scheduler,
RNG, data position, counters; :mod:`evip.checkpoint`), resumed from the newest checkpoint of the run folder,
and exported at the end as a release-layout folder (``<output_dir>/export``) that ``mono`` and LMDeploy load.

Run folder: ``config.yaml`` (the resolved config), ``checkpoints/``, ``metrics.jsonl`` (rank 0, one line per
logged step), ``tb/`` (TensorBoard), ``skipped-rank<r>.jsonl`` (every skipped sample), ``export/``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from mono import MonoInternVL

from . import metrics as M
from .build import build_model
from .checkpoint import Checkpointer, TrainState
from .config import load_config, save_config, to_dict
from .data.loader import TrainLoader, merge_states
from .data.preprocess import Preprocessor
from .data.sources import build_sources
from .job import JobConfig
from .loss import IGNORE, scale_loss, step_denominator, weighted_ce
from .stages import set_trainable

__all__ = ["NonFiniteError", "TrainResult", "Trainer", "main", "train"]


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class TrainResult:
    """What a finished stage reports."""

    step: int
    losses: dict[int, float]
    export_dir: Optional[Path]
    skips: dict[str, int]
    nonfinite_steps: int


# --------------------------------------------------------------------------------------------- environment


def _init_distributed(device_kind: str) -> tuple[int, int, torch.device]:
    """``(rank, world_size, device)``; initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("parallel.device is 'cuda' but CUDA is not available; use 'auto' or 'cpu'")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, (dist.get_world_size() if dist.is_initialized() else 1), device


def close_distributed() -> None:
    """End the process group on every rank together: wait for all ranks, free the trainer's sharded tensors, then
    destroy the group. Without the barrier and the collection, gloo aborted about every other 2-rank run at exit
    ("terminate called without an active exception"): one rank tore its connections down while another still
    exported, or FSDP parameters that outlived the group were freed during interpreter shutdown."""
    if not dist.is_initialized():
        return
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def _all_reduce(value: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=op or dist.ReduceOp.SUM)
    return value


def _average_gradients(params: Sequence[torch.nn.Parameter], world: int) -> None:
    """Replicated data parallelism (``parallel.fsdp: false`` on several ranks): average the gradients over the ranks
    in one flat all-reduce, as DDP does (the loss is scaled by the world size, see :mod:`evip.loss`). A parameter
    without a gradient on every rank (one that no token reached) keeps none, as in a single process, so AdamW
    skips it; one with a gradient on some rank gets the average, zeros standing in for the ranks without."""
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([present, *(g.reshape(-1) for g in grads)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = len(params)
    for reached, p, g in zip(flat[:offset].tolist(), params, grads):  # one host sync for all the flags
        n = g.numel()
        if reached > 0:
            p.grad = flat[offset:offset + n].view_as(p).div_(world)
        offset += n


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cosine_schedule(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warm-up to 1, then cosine to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _wants_fsdp(fsdp: bool, world: int, device: torch.device) -> bool:
    """FSDP2 with several ranks, and on a single GPU too (its bf16 policy keeps fp32 master weights and reduces in
    fp32); a single CPU process trains the plain module."""
    return fsdp and (world > 1 or device.type == "cuda")


def _pad_id(tokenizer) -> int:
    """Padding id: the tokenizer's pad token, else its EOS (padding is never attended to nor supervised)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights and the learned position/class embeddings are not decayed."""
    return param.ndim < 2 or name.endswith(("position_embedding", "class_embedding"))


# --------------------------------------------------------------------------------------------- the trainer


class Trainer:
    """Everything one stage needs; :meth:`run` trains it. ``job`` is a resolved :class:`~evip.job.JobConfig`."""

    def __init__(self, job: JobConfig):
        self.job = job
        self.out = Path(job.output_dir)
        self.rank, self.world, self.device = _init_distributed(job.parallel.device)
        if job.model.moe_backend:
            os.environ["MONO_MOE_BACKEND"] = job.model.moe_backend
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(job, self.out / "config.yaml")
        self._barrier()

        torch.manual_seed(job.seed)
        model, self.tokenizer = build_model(job)
        self.model_config = model.config
        self.trainable = set_trainable(model, list(job.trainable_groups))
        if job.parallel.activation_checkpointing:
            model.language_model.model.gradient_checkpointing = True
        self.bf16 = job.parallel.mixed_precision == "bf16" or (
            job.parallel.mixed_precision == "auto" and self.device.type == "cuda"
        )
        self.model = self._shard(model)
        self.optimizer = self._optimizer()
        total, warmup = job.schedule.steps, math.ceil(job.warmup_ratio * job.schedule.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_schedule(s, total, warmup, job.schedule.min_lr_ratio)
        )
        self.loader = self._loader()
        self.checkpointer = Checkpointer(self.out / "checkpoints", keep_last=job.checkpoint.keep_last)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.resumed_step: Optional[int] = None

    # ------------------------------------------------------------------------------------------ building

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _shard(self, model: MonoInternVL) -> torch.nn.Module:
        sharded = _wants_fsdp(self.job.parallel.fsdp, self.world, self.device)
        self.sharded = sharded
        self.replicated = self.world > 1 and not sharded
        if self.replicated:  # every rank a whole copy, started from rank 0's values (fresh initialisations agree)
            model.to(self.device)
            with torch.no_grad():
                for tensor in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(tensor.data, src=0)
            return model
        if not sharded:
            return model.to(self.device)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():  # one device without torchrun: FSDP2 still needs a (one-rank) group
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else None
        kwargs = {"mp_policy": mp} if mp is not None else {}
        model.to(self.device)
        for layer in model.language_model.model.layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def _optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if _no_decay(name, p) else decay).append(p)
        o = self.job.optim
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self.job.lr, betas=o.betas, eps=o.eps,
            foreach=self.device.type == "cuda" or None,
        )

    def _loader(self) -> TrainLoader:
        job, cfg = self.job, self.model_config
        sources = build_sources(job.data.datasets, job.max_tiles)
        preprocess = Preprocessor.for_model(
            cfg, self.tokenizer, job.data, max_seq_len=job.max_seq_len,
            system_message=job.model.system_message,
        )
        return TrainLoader(
            sources, preprocess, rank=self.rank, world_size=self.world,
            micro_batch_size=job.data.micro_batch_size, packed=job.data.packing, max_seq_len=job.max_seq_len,
            weighting=job.weighting, pad_id=_pad_id(self.tokenizer), image_size=cfg.image_size,
            seed=job.data.seed, shuffle=job.data.shuffle, num_workers=job.data.num_workers,
            log_skips=job.data.log_skips if self.rank == 0 else 0, skip_log=self.out / f"skipped-rank{self.rank}.jsonl",
        )

    # ------------------------------------------------------------------------------------------ checkpoints

    def _state(self) -> TrainState:
        return TrainState(self.model, self.optimizer, scheduler=self.scheduler)

    def save(self) -> Path:
        extra = {
            "data": _gather(self.loader.state_dict()),
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_row": self.nonfinite_in_row,
        }
        return self.checkpointer.save(self.step, self._state(), extra=extra)

    def maybe_resume(self) -> bool:
        if not self.job.checkpoint.resume or self.checkpointer.latest() is None:
            return False
        meta = self.checkpointer.load(self._state())
        extra = meta["extra"]
        self.step = int(meta["step"])
        self.resumed_step = self.step
        self.nonfinite_total = int(extra.get("nonfinite_total", 0))
        self.nonfinite_in_row = int(extra.get("nonfinite_in_row", 0))
        states = extra["data"]
        if len(states) == self.world:
            self.loader.load_state_dict(states[self.rank])
        else:
            self.loader.load_state_dict(merge_states(states, self.world)[self.rank])
            self._print(
                f"resumed a checkpoint of {len(states)} ranks on {self.world}: the data order cannot continue "
                "exactly; it restarts at a safe position (no sample is skipped, a few may repeat)"
            )
        self._print(f"resumed from {self.checkpointer.latest()} at step {self.step}")
        return True

    def export(self) -> Path:
        """Write the trained model as a release-layout HF folder (atomic: written aside, then renamed)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        target = self.out / "export"
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            staging = self.out / ".export.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            config = copy.deepcopy(self.model_config)
            # The tiling the model was trained with becomes its inference default (as InternVL's fine-tuning does):
            # chat and `evip eval` then tile images as training did.
            config.max_dynamic_patch = self.job.max_tiles
            config.min_dynamic_patch = min(self.job.data.min_tiles, self.job.max_tiles)
            with torch.device("meta"):
                model = MonoInternVL(config)
            model.load_state_dict(state, assign=True)
            dtype = self.job.checkpoint.export_dtype
            if dtype == "bfloat16" or (dtype == "auto" and self.bf16):
                model.to(torch.bfloat16)
            model.save_pretrained(staging)
            self.tokenizer.save_pretrained(staging)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        self._barrier()
        return target

    # ------------------------------------------------------------------------------------------ the loop

    def _print(self, line: str) -> None:
        if self.rank == 0:
            writer = getattr(self, "progress", None)
            (writer.write if writer is not None else print)(line)

    def _autocast(self):
        if self.bf16 and not self.sharded:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_loss(self, batch, denominator: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss to backpropagate, this micro-batch's weighted CE sum)``; see :mod:`evip.loss`.

        Logits are computed only where a target is (the LM head and its fp32 logits are the widest tensors of a
        step; captions and answers are a fraction of the tokens)."""
        keep = batch.targets_BT != IGNORE
        with self._autocast():
            out = self.model(
                input_ids=batch.input_ids_BT, position_ids=batch.position_ids_BT,
                attention_mask=batch.packed if batch.packed is not None else batch.attention_mask_BTT,
                pixel_values=batch.pixel_values_N,
                image_flags=batch.image_flags_N, logits_to_keep=keep,
            )
        loss_sum, _ = weighted_ce(out.logits[None], batch.targets_BT[keep][None], batch.weights_BT[keep][None])
        return scale_loss(loss_sum, denominator, self.world), loss_sum.detach()

    def train_step(self, batches: Sequence) -> tuple[float, float, bool]:
        """One optimizer step over this rank's micro-batches; ``(loss, grad_norm, applied)``."""
        denominator = step_denominator(batches)  # all ranks' weight sum of the step
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        sync = getattr(self.model, "set_requires_gradient_sync", None)
        for i, batch in enumerate(batches):
            if sync is not None:
                sync(i == len(batches) - 1)  # FSDP2: reduce-scatter once per step, not per micro-batch
            loss, loss_sum = self._forward_loss(batch.to(self.device), denominator)
            loss.backward()
            total += loss_sum.float()
        loss_value = float(_all_reduce(total) / denominator)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.replicated:
            _average_gradients(params, self.world)
        clip = self.job.optim.grad_clip if self.job.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=self.device.type == "cuda" or None)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        norm_value = float(norm)
        applied = math.isfinite(loss_value) and math.isfinite(norm_value)
        if applied:
            self.optimizer.step()
            self.nonfinite_in_row = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_value, norm_value, applied

    def run(self, stop_at: Optional[int] = None) -> TrainResult:
        """Train to ``schedule.steps`` (or stop after step ``stop_at``: for tests and for splitting a job)."""
        job = self.job
        self.maybe_resume()
        total = job.schedule.steps
        end = total if stop_at is None else min(stop_at, total)
        sinks = M.build_sinks(job.logging, self.out, self.rank, to_dict(job))
        self.progress = M.Progress(total, initial=self.step, mode=job.logging.progress, rank=self.rank)
        meter = M.StepMeter(
            total_steps=total, peak_flops=M.peak_flops(self.device, job.logging.peak_tflops), device=self.device,
            nonfinite_steps=self.nonfinite_total,
        )
        metrics_file = self._open_metrics() if self.rank == 0 else None
        losses: dict[int, float] = {}
        num_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)  # DTensor: global
        self._print(
            f"stage {job.stage} ({job.spec.title}): steps {self.step + 1}..{end} of {total}, {self.world} rank(s) on "
            f"{self.device.type}, training {', '.join(job.trainable_groups)} ({num_trainable:,} parameters)"
        )
        iterator = iter(self.loader)
        self.model.train()
        try:
            while self.step < end:
                with meter.data_wait():
                    batches = [next(iterator) for _ in range(job.schedule.grad_accum)]
                for batch in batches:
                    meter.add_batch(
                        text_tokens=batch.num_text_tokens, visual_tokens=batch.num_visual_tokens,
                        samples=batch.num_samples, flops=self._flops(batch),
                    )
                loss, norm, applied = self.train_step(batches)
                self.step += 1
                losses[self.step] = loss
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                meter.end_step(
                    self.step, loss=loss, lr=self.scheduler.get_last_lr()[0], grad_norm=norm,
                    nonfinite=not applied, skipped=self.loader.skips.reasons(),
                )
                self.progress.update(self.step, loss)
                if not applied:
                    self._print(
                        f"step {self.step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                        f"(loss {loss}, grad norm {norm}); update skipped ({self.nonfinite_in_row} in a row, "
                        f"{self.nonfinite_total} in total)"
                    )
                    if self.nonfinite_in_row >= job.schedule.max_nonfinite:
                        raise NonFiniteError(
                            f"{self.nonfinite_in_row} steps in a row had a non-finite loss or gradient (last: step "
                            f"{self.step}, loss {loss}, grad norm {norm}); stopping. Lower optim.lr, check the data "
                            f"(skipped samples: {self.out}/skipped-rank*.jsonl) or raise schedule.max_nonfinite"
                        )
                if self.step % job.logging.every == 0 or self.step == end:
                    report = meter.report()  # collective: every rank calls it at the same steps
                    sinks.log(self.step, report.metrics)
                    self._print(report.line)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps({"step": self.step, "loss_step": loss, **report.metrics}) + "\n")
                        metrics_file.flush()
                if self.step % job.checkpoint.every == 0 or self.step == total:
                    self.save()
        finally:
            self.progress.close()
            sinks.close()
            if metrics_file is not None:
                metrics_file.close()
        if self.step != self.resumed_step and self.step % job.checkpoint.every != 0 and self.step != total:
            self.save()  # stopped early (stop_at): keep the position
        export = self.export() if self.step == total and job.checkpoint.export else None
        return TrainResult(self.step, losses, export, self._skips(), self.nonfinite_total)

    def _open_metrics(self):
        """``metrics.jsonl`` for appending, without lines past the current step (written after the checkpoint we
        resumed from, by a run that then died: those steps run again)."""
        path = self.out / "metrics.jsonl"
        if path.is_file():
            kept = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= self.step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(x + "\n" for x in kept))
            os.replace(tmp, path)
        return open(path, "a")

    def _flops(self, batch) -> M.FlopCount:
        """Model FLOPs of one micro-batch (3x forward), counted on its real tokens and per-sample lengths."""
        return M.model_flops(
            self.model_config, num_text_tokens=batch.num_text_tokens, num_visual_tokens=batch.num_visual_tokens,
            seq_lens=batch.seq_lens, num_tiles=int(batch.image_flags_N.sum()) if batch.image_flags_N is not None else 0,
            num_logit_tokens=int((batch.targets_BT != IGNORE).sum()),
        )

    def _skips(self) -> dict[str, int]:
        """Skipped samples per reason, summed over the ranks."""
        merged: dict[str, int] = {}
        for counts in _gather(self.loader.skips.reasons()):
            for k, v in counts.items():
                merged[k] = merged.get(k, 0) + v
        return merged


def train(job: JobConfig, stop_at: Optional[int] = None) -> TrainResult:
    """Train one stage (see the module docstring)."""
    return Trainer(job).run(stop_at=stop_at)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``evip train stage.yaml [key=value ...]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="evip train", description="Train one EViP stage.")
    parser.add_argument("config", type=Path, help="stage YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 schedule.steps=10")
    parser.add_argument("--stop-at", type=int, default=None, help="stop after this step (checkpointed)")
    args = parser.parse_args(argv)
    job = load_config(JobConfig, args.config, args.overrides)
    train(job, stop_at=args.stop_at)
    close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
