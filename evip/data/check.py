"""Offline data check (``evip data check``): run every sample of a data mixture through the sources and the full
preprocessor, report what would be skipped and why, and precompute token lengths.

The report (``<out>/report.json``) has, per dataset: samples, used, skipped per reason, the first skipped sample
ids with details per reason, token-length and tile statistics, and the source's indexing problems (truncated
shards). Token lengths are written per dataset as ``<out>/lengths/<k>-<name>.npy`` (int32, one entry per indexed
sample in the source's order, -1 for a skipped sample), for length-aware batching without re-tokenizing.

Exit status of :func:`main`: 0 when every sample is usable, 1 when some are skipped or a source had problems (the
report is written either way), 2 for usage or configuration errors.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..job import DataConfig, DatasetConfig
from .preprocess import Preprocessor, tokens_per_tile
from .sources import Source, build_sources
from .types import SKIP_REASONS, SkipSample

__all__ = ["CheckError", "check_dataset", "check_sources", "format_report", "main"]

_CHUNK = 64  # samples per task of a worker process

# Set in worker processes by _init_worker (a fork inherits them; spawn pickles them once per worker).
_WORKER: dict[str, Any] = {}


class CheckError(RuntimeError):
    """A sample failed with an error that is not a :class:`SkipSample` (a bug in a source, the preprocessor or the
    data); the message names the dataset and the sample, the original exception is the ``__cause__``."""


def _check_one(source: Source, preprocessor: Preprocessor, i: int) -> tuple[int, int, Optional[str], str, str]:
    """``(tokens, tiles, skip reason or None, sample id, detail)`` of sample ``i``.

    Raises:
        CheckError: any error other than :class:`SkipSample`, naming the sample (as the training loader does).
    """
    raw = None
    try:
        raw = source.get(i)
        example = preprocessor(raw, epoch=0)
    except SkipSample as skip:
        return -1, 0, skip.reason, skip.sample_id, skip.detail
    except Exception as exc:
        what = raw.sample_id if raw is not None else f"sample {i}"
        raise CheckError(
            f"checking {what} of dataset {source.name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return len(example), sum(example.num_tiles), None, raw.sample_id, ""


def _init_worker(sources: list[Source], preprocessor: Preprocessor) -> None:
    # One intra-op thread per worker, as torch's DataLoader workers do: the workers are the parallelism, and a
    # forked child must not use the parent's OpenMP thread pool (libgomp is not fork-safe: the child hangs).
    torch.set_num_threads(1)
    _WORKER["sources"], _WORKER["preprocessor"] = sources, preprocessor


def _check_chunk(task: tuple[int, int, int]) -> list[tuple[int, int, Optional[str], str, str]]:
    k, lo, hi = task
    return [_check_one(_WORKER["sources"][k], _WORKER["preprocessor"], i) for i in range(lo, hi)]


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    pct = np.percentile(values, [50, 95, 99])
    return {
        "min": int(values.min()), "mean": round(float(values.mean()), 2), "p50": float(pct[0]),
        "p95": float(pct[1]), "p99": float(pct[2]), "max": int(values.max()), "total": int(values.sum()),
    }


def _histogram(values: np.ndarray) -> dict[str, int]:
    return {str(v): int(c) for v, c in zip(*np.unique(values, return_counts=True))}


def _progress(total: int, enabled: Optional[bool]):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, unit="sample", desc="checking", file=sys.stderr)
        except ImportError:
            pass
    return None


def check_sources(
    sources: Sequence[Source],
    preprocessor: Preprocessor,
    *,
    out_dir: str | Path | None = None,
    max_examples: int = 10,
    workers: int = 0,
    progress: Optional[bool] = None,
) -> dict:
    """Check every sample of ``sources`` with ``preprocessor`` (epoch 0); return the report, and write it with the
    token lengths under ``out_dir`` when given (see the module docstring).

    ``workers`` > 0 spreads the samples over that many processes; the report is the same. ``progress`` shows a
    tqdm bar (``None``: when stderr is a terminal).
    """
    results: list[list] = [[None] * len(s) for s in sources]
    tasks = [(k, lo, min(lo + _CHUNK, len(s))) for k, s in enumerate(sources) for lo in range(0, len(s), _CHUNK)]
    bar = _progress(sum(len(s) for s in sources), progress)
    try:
        if workers > 0 and tasks:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            context = multiprocessing.get_context(method)
            with context.Pool(workers, initializer=_init_worker, initargs=(list(sources), preprocessor)) as pool:
                for (k, lo, hi), chunk in zip(tasks, pool.imap(_check_chunk, tasks)):
                    results[k][lo:hi] = chunk
                    if bar is not None:
                        bar.update(hi - lo)
        else:
            for k, lo, hi in tasks:
                results[k][lo:hi] = [_check_one(sources[k], preprocessor, i) for i in range(lo, hi)]
                if bar is not None:
                    bar.update(hi - lo)
    finally:
        if bar is not None:
            bar.close()

    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        (out / "lengths").mkdir(parents=True, exist_ok=True)
    report_sets = []
    for k, (source, rows) in enumerate(zip(sources, results)):
        lengths = np.asarray([r[0] for r in rows], dtype=np.int32)
        tiles = np.asarray([r[1] for r in rows if r[2] is None], dtype=np.int64)
        skipped: Counter[str] = Counter()
        examples: dict[str, list[dict[str, str]]] = {}
        for _, _, reason, sample_id, detail in rows:
            if reason is not None:
                skipped[reason] += 1
                if len(examples.setdefault(reason, [])) < max_examples:
                    examples[reason].append({"sample_id": sample_id, "detail": detail})
        entry = {
            "name": source.name,
            "kind": source.kind,
            "repeat": source.repeat,
            "max_tiles": source.max_tiles,
            "augment": source.augment,
            "samples": len(source),
            "used": int((lengths >= 0).sum()),
            "skipped": int(sum(skipped.values())),
            "skipped_by_reason": {r: skipped[r] for r in SKIP_REASONS if skipped[r]},
            "skipped_examples": {r: examples[r] for r in SKIP_REASONS if r in examples},
            "tokens": _stats(lengths[lengths >= 0]),
            "tiles": {**_stats(tiles), "histogram": _histogram(tiles)},
            "problems": list(source.problems),
        }
        if out is not None:
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", source.name)
            path = out / "lengths" / f"{k:02d}-{safe}.npy"
            np.save(path, lengths)
            entry["lengths_file"] = str(path.relative_to(out))
        report_sets.append(entry)
    totals: Counter[str] = Counter()
    for entry in report_sets:
        totals.update(entry["skipped_by_reason"])
    report = {
        "ok": all(e["skipped"] == 0 and not e["problems"] for e in report_sets),
        "settings": {
            "max_seq_len": preprocessor.max_seq_len, "num_image_token": preprocessor.num_image_token,
            "image_size": preprocessor.image_size, "template": preprocessor.template.name,
            "min_tiles": preprocessor.min_tiles, "use_thumbnail": preprocessor.use_thumbnail,
        },
        "totals": {
            "samples": sum(e["samples"] for e in report_sets),
            "used": sum(e["used"] for e in report_sets),
            "skipped": sum(e["skipped"] for e in report_sets),
            "skipped_by_reason": {r: totals[r] for r in SKIP_REASONS if totals[r]},
            "problems": sum(len(e["problems"]) for e in report_sets),
        },
        "datasets": report_sets,
    }
    if out is not None:
        tmp = out / "report.json.tmp"
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        tmp.replace(out / "report.json")
    return report


def check_dataset(
    datasets: Sequence[DatasetConfig],
    preprocessor: Preprocessor,
    *,
    default_max_tiles: int,
    out_dir: str | Path | None = None,
    max_examples: int = 10,
    workers: int = 0,
    progress: Optional[bool] = None,
) -> dict:
    """Build the sources of ``datasets`` (:func:`~evip.data.sources.build_sources`) and :func:`check_sources` them.

    Raises:
        FileNotFoundError / ValueError: a dataset config that cannot be built (the message names it).
    """
    sources = build_sources(datasets, default_max_tiles)
    return check_sources(
        sources, preprocessor, out_dir=out_dir, max_examples=max_examples, workers=workers, progress=progress
    )


def format_report(report: dict) -> str:
    """A few human-readable lines summarising ``report``."""
    lines = []
    for e in report["datasets"]:
        reasons = ", ".join(f"{r} {n}" for r, n in e["skipped_by_reason"].items())
        tokens = e["tokens"]
        length = f", tokens mean {tokens['mean']} max {tokens['max']}" if tokens else ""
        lines.append(
            f"{e['name']}: {e['samples']} samples, {e['used']} usable, {e['skipped']} skipped"
            + (f" ({reasons})" if reasons else "") + length
        )
        lines += [f"  problem: {p}" for p in e["problems"]]
        for reason, items in e["skipped_examples"].items():
            lines += [f"  {reason}: {item['sample_id']}: {item['detail']}" for item in items[:3]]
    t = report["totals"]
    lines.append(
        f"total: {t['samples']} samples, {t['used']} usable, {t['skipped']} skipped, {t['problems']} problem(s)"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI
_PATH_MODE_FLAGS = ("format", "image_root", "image_size", "patch_size", "downsample_ratio", "max_seq_len", "max_tiles",
                    "min_tiles", "template", "system_message", "caption_prompt", "seed")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evip data check",
        description="Run every sample of a dataset through the sources and the preprocessor; write a skip report "
        "and token lengths. Exit 0: all usable; 1: some skipped; 2: usage or config error.",
    )
    p.add_argument("path", nargs="?", help="meta JSON, JSONL file, or webdataset shard / folder / glob")
    p.add_argument("--config", help="a stage YAML (JobConfig): check its data.datasets with its settings")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of the --config file (repeatable), e.g. data.max_seq_len=4096")
    p.add_argument("--tokenizer", help="tokenizer folder or .gguf file (with --config: default model.tokenizer/init)")
    p.add_argument("--format", choices=["meta", "jsonl", "webdataset"], help="default: from the path")
    p.add_argument("--image-root", help="folder of a JSONL file's relative image paths (default: its folder)")
    p.add_argument("--image-size", type=int, help="tile size S (default 448)")
    p.add_argument("--patch-size", type=int, help="patch size (default 14)")
    p.add_argument("--downsample-ratio", type=float, help="pixel-shuffle ratio (default 0.5)")
    p.add_argument("--max-seq-len", type=int, help="token cap of a sample (default 2048)")
    p.add_argument("--max-tiles", type=int, help="dynamic-tiling cap (default 6)")
    p.add_argument("--min-tiles", type=int, help="minimum tiles (default 1)")
    p.add_argument("--no-thumbnail", action="store_true", help="no whole-image thumbnail tile")
    p.add_argument("--template", help="chat template (default internlm2-chat)")
    p.add_argument("--system-message", help="system message (default: the template's)")
    p.add_argument("--caption-prompt", help="user turn of an image-text pair")
    p.add_argument("--seed", type=int, help="augmentation seed (default 0)")
    p.add_argument("--out", help="report folder (default: ./data-check, or <output_dir>/data-check with --config)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default 0: this process)")
    p.add_argument("--examples", type=int, default=10, help="skipped sample ids kept per reason and dataset")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto")
    return p


def _infer_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(".json"):
        return "meta"
    if lower.endswith(".jsonl"):
        return "jsonl"
    if lower.endswith(".tar") or any(c in path for c in "*?[") or os.path.isdir(path):
        return "webdataset"
    raise ValueError(f"cannot tell the format of '{path}' from its name; pass --format meta|jsonl|webdataset")


def _from_config(args: argparse.Namespace) -> tuple[list[DatasetConfig], Preprocessor, int, Path]:
    from mono.tokenization import load_tokenizer

    from ..config import load_config
    from ..job import JobConfig

    extra = [f"--{f.replace('_', '-')}" for f in _PATH_MODE_FLAGS if getattr(args, f) is not None]
    extra += ["--no-thumbnail"] if args.no_thumbnail else []
    extra += [args.path] if args.path is not None else []
    if extra:
        raise ValueError(
            f"--config takes the data and model settings from the file; drop {' '.join(extra)} and use --override "
            "(e.g. --override data.max_seq_len=4096)"
        )
    cfg = load_config(JobConfig, args.config, args.override)
    tokenizer_path = args.tokenizer or cfg.model.tokenizer or cfg.model.init
    if tokenizer_path is None:
        raise ValueError(f"{args.config}: neither model.tokenizer nor model.init is set; pass --tokenizer")
    tokenizer = load_tokenizer(tokenizer_path)
    model_config = _model_config(cfg.model)
    if model_config is not None:
        preprocessor = Preprocessor.for_model(
            model_config, tokenizer, cfg.data, cfg.max_seq_len, system_message=cfg.model.system_message
        )
    else:
        # A new model (stage s1.1 from a plain LLM): the settings MonoInternVL.from_llm will build it with.
        from mono.conversion import _guess_template
        from mono.templates import get_template

        preprocessor = Preprocessor(
            tokenizer, get_template(cfg.model.template or _guess_template(tokenizer)),
            tokens_per_tile(cfg.model.image_size, cfg.model.patch_size), cfg.model.image_size, cfg.max_seq_len,
            min_tiles=cfg.data.min_tiles, use_thumbnail=cfg.data.use_thumbnail, caption_prompt=cfg.data.caption_prompt,
            system_message=cfg.model.system_message, seed=cfg.data.seed,
        )
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "data-check"
    return list(cfg.data.datasets), preprocessor, cfg.max_tiles, out


def _model_config(model_cfg):
    """The Mono config of ``model.config`` or a Mono ``model.init`` folder; None for a plain LLM init."""
    from mono import MonoInternVLConfig

    if model_cfg.config is not None:
        return MonoInternVLConfig.from_json_file(str(model_cfg.config))
    init = Path(model_cfg.init) if model_cfg.init is not None else None
    if init is not None and (init / "config.json").is_file():
        if json.loads((init / "config.json").read_text()).get("model_type") == "internvl_chat":
            return MonoInternVLConfig.from_pretrained(str(init))
    return None


def _from_path(args: argparse.Namespace) -> tuple[list[DatasetConfig], Preprocessor, int, Path]:
    from mono.templates import get_template
    from mono.tokenization import load_tokenizer

    if args.path is None:
        raise ValueError("give a dataset path (meta JSON, JSONL or shards) or --config stage.yaml")
    if args.tokenizer is None:
        raise ValueError("--tokenizer is required without --config")
    fmt = args.format or _infer_format(args.path)
    if args.image_root is not None and fmt != "jsonl":
        raise ValueError("--image-root applies to a JSONL file only")

    def given(value, default):
        return default if value is None else value

    image_size = given(args.image_size, 448)
    dataset = DatasetConfig(
        path=Path(args.path), format=fmt, image_root=Path(args.image_root) if args.image_root else None
    )
    preprocessor = Preprocessor(
        load_tokenizer(args.tokenizer), get_template(given(args.template, "internlm2-chat")),
        tokens_per_tile(image_size, given(args.patch_size, 14), given(args.downsample_ratio, 0.5)), image_size,
        given(args.max_seq_len, 2048), min_tiles=given(args.min_tiles, 1), use_thumbnail=not args.no_thumbnail,
        caption_prompt=given(args.caption_prompt, DataConfig.caption_prompt), system_message=args.system_message,
        seed=given(args.seed, 0),
    )
    return [dataset], preprocessor, given(args.max_tiles, 6), Path(given(args.out, "data-check"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``evip data check``: see :func:`_parser` for the arguments; returns the exit status (0, 1 or 2)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on a usage error, 0 for --help
        return int(exc.code or 0)
    if args.workers < 0 or args.examples < 0:
        print("evip data check: error: --workers and --examples must be >= 0", file=sys.stderr)
        return 2
    try:
        if args.config is not None:
            datasets, preprocessor, max_tiles, out = _from_config(args)
        else:
            datasets, preprocessor, max_tiles, out = _from_path(args)
        sources = build_sources(datasets, max_tiles)
    except (ValueError, OSError) as exc:  # ConfigError is a ValueError; a missing file an OSError
        print(f"evip data check: error: {exc}", file=sys.stderr)
        return 2
    if args.workers:
        # The tokenizer is used before the fork; its thread pool must not be (the library would warn per worker).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    progress = {"auto": None, "on": True, "off": False}[args.progress]
    report = check_sources(
        sources, preprocessor, out_dir=out, max_examples=args.examples, workers=args.workers, progress=progress
    )
    print(format_report(report))
    print(f"report: {out / 'report.json'}")
    return 0 if report["ok"] else 1
