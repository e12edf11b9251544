"""The embedded default (``make demo``): a small pre-trained LM becomes a native MLLM through all EViP stages.

1. write the bundled synthetic data (:mod:`evip.demo.datasets`; cached by its manifest);
2. pre-train the demo base LM on bundled text (:mod:`evip.demo.base_lm`; cached by its fingerprint);
3. run the recipe ``configs/evip/demo/recipe.yaml`` stage by stage, evaluating after each stage: per-task accuracy
   on the held-out splits and text perplexity of held-out text (bit-identical to the base LM through S1.1/S1.2);
4. write the report (table, JSON, loss and accuracy plots) and ask the final model about a held-out image.

``--ablation`` runs the chain a second time with delta tuning off (the LLM trains from S1.1 on), so the
forgetting the method avoids shows side by side in the report.

``--ranks N`` (default: 2 where the machine has 2 cores or more) trains with N processes of one thread each,
replicated data parallel over gloo (``parallel.fsdp=false``): the demo model is too small for two threads to speed
one process up (a step took 84 ms with one process of two threads, 108 ms for twice the samples with two
processes of one thread), so the second core is used by a second rank. ``python -m evip.demo`` relaunches itself
under ``torch.distributed.run``; rank 0 writes the data (two processes), builds the base LM, computes the text
perplexities and reports (with N threads while the other ranks wait); every rank trains and answers its share of
the held-out questions. The recipe's steps are optimizer steps: each one sees N packed
rows, one per rank.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from evip.eval import evaluate_tasks, text_perplexity
from evip.recipe import stage_jobs
from evip.report import Ablation, write_report
from evip.train import close_distributed, train
from mono import MonoInternVL
from mono.tokenization import load_tokenizer

from .base_lm import BaseLMConfig, build_base_lm
from .datasets import DemoDataSizes, text_corpus, write_demo_data
from .launch import ROOT, parse, relaunch

RECIPE = ROOT / "configs" / "evip" / "demo" / "recipe.yaml"
DEFAULT_DATA = Path(".cache/demo/data")  # where the recipe's dataset paths point

# The shortened version `make test` runs end to end (same code, tiny sizes).
QUICK_SIZES = DemoDataSizes(
    s1_1=48, s1_2=48, s1_3_shapes=16, s1_3_scenes=24, s1_3_digits=24, s2_scenes=16, s2_digits=8, s2_text=8,
    eval_per_task=4,
    shard_size=32,
)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


@contextlib.contextmanager
def _all_threads():
    """Rank 0's work while the other ranks wait (base LM, evaluation): one thread per rank of the run."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, _world()))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _evaluate(
    folder: Path, data, held_out: Sequence[str], seq_len: int, limit: Optional[int]
) -> tuple[dict, Optional[float]]:
    """Every rank answers its share of the held-out questions (one thread each); rank 0 then computes the text
    perplexity alone, with the thread count of the base LM's figure (so the two compare bit for bit); the other
    ranks return None for it."""
    model = MonoInternVL.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(folder)
    results = evaluate_tasks(model, tokenizer, data.eval_dir, max_tiles=4, limit=limit, progress="off",
                             distributed=_world() > 1)
    if _rank() != 0:
        return results, None
    with _all_threads():
        return results, text_perplexity(model, tokenizer, list(held_out), seq_len)


def run_chain(
    label: str, out: Path, data, base, overrides: Sequence[str], limit: Optional[int], log=print
) -> tuple[dict, dict, dict, dict]:
    """Train every run of the demo recipe under ``out``; accuracy, perplexity, seconds and run folder per run (keyed
    by the run's name, in recipe order). Every rank trains and answers its share of the evaluation; rank 0 returns
    the results (the others return empty ones)."""
    if _world() > 1:
        overrides = [*overrides, "parallel.fsdp=false"]
    _, jobs = stage_jobs(RECIPE, overrides, output_dir=out, init=base.folder)
    accuracy, perplexity, seconds, runs = {}, {}, {}, {}
    for job in jobs:
        for dataset in job.data.datasets:  # the recipe names the default data folder; use the one written
            if dataset.path.parts[:3] == DEFAULT_DATA.parts:
                dataset.path = Path(data.root, *dataset.path.parts[3:])
        name = Path(job.output_dir).name  # the recipe's run name: the stage, or e.g. s1.3-shapes for a first phase
        t0 = time.perf_counter()
        result = train(job)
        seconds[name] = time.perf_counter() - t0
        runs[name] = Path(job.output_dir)
        t0 = time.perf_counter()
        tasks, ppl = _evaluate(result.export_dir, data, base.held_out_texts, base.seq_len, limit)
        if _rank() != 0:
            continue  # the next run's trainer waits for rank 0's perplexity
        accuracy[name], perplexity[name] = tasks, ppl
        seconds[f"eval {name}"] = time.perf_counter() - t0
        table = ", ".join(f"{t} {r['accuracy']:.0%}" for t, r in accuracy[name]["tasks"].items())
        log(f"[{label}] {name}: {table}; text perplexity {perplexity[name]:.4f} ({seconds[name]:.0f} s)")
    return accuracy, perplexity, seconds, runs


def run_demo(out: Path, *, quick: bool = False, ablation: bool = False, log=print) -> Optional[Path]:
    """Run the whole demo into ``out``; returns the report file (on rank 0; None on the other ranks of a
    multi-process run, see the module docstring)."""
    rank, world = _rank(), _world()
    if rank != 0:
        log = _silent
    timings: dict[str, float] = {}
    sizes = QUICK_SIZES if quick else None
    base_config = BaseLMConfig(steps=30, log_every=10) if quick else BaseLMConfig()
    extra_texts = text_corpus(200 if quick else 2000)
    if rank == 0:
        with _all_threads():
            t0 = time.perf_counter()
            # Two processes write the parts side by side (13.8 s -> 8.7 s measured alone); quick sizes: one.
            data = write_demo_data(out / "data", sizes=sizes, workers=1 if quick else min(2, os.cpu_count() or 1))
            timings["data"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            base = build_base_lm(out / "base_lm", base_config, extra_texts=extra_texts, log=log)
            timings["base LM"] = time.perf_counter() - t0
            base_model = MonoInternVL.from_llm(str(base.folder), tokenizer=load_tokenizer(base.folder),
                                               dtype=torch.float32)
            base_ppl = text_perplexity(base_model, load_tokenizer(base.folder), list(base.held_out_texts),
                                       base.seq_len)
            del base_model
    _barrier()
    if rank != 0:  # both are cached now: these only read what rank 0 wrote
        data = write_demo_data(out / "data", sizes=sizes)
        base = build_base_lm(out / "base_lm", base_config, extra_texts=extra_texts, log=log)
    overrides = ["schedule.steps=3", "logging.every=1"] if quick else []
    limit = 4 if quick else None
    accuracy, perplexity, seconds, runs = run_chain("EViP", out / "runs" / "evip", data, base, overrides, limit, log)
    timings.update(seconds)
    extra = None
    if ablation:
        off = [*overrides, "delta_tuning=false"]
        a_acc, a_ppl, a_sec, a_runs = run_chain(
            "no delta tuning", out / "runs" / "ablation", data, base, off, limit, log
        )
        extra = Ablation("delta tuning off", a_acc, {"base": base_ppl, **a_ppl}, a_runs, a_sec) if rank == 0 else None
    if rank != 0:
        return None
    last = runs[list(runs)[-1]] / "export"
    report = write_report(
        out / "report", accuracy, {"base": base_ppl, **perplexity}, timings,
        [f"final model: {last}", f"data: {data.root} (manifest.json)", f"base LM: {base.folder}",
         f"training: {world} rank(s) of {torch.get_num_threads()} thread(s) each"
         + (" (replicated data parallel over gloo)" if world > 1 else "")],
        stage_runs=runs, ablation=extra,
    )
    log(f"report: {report}")
    chat_about_held_out_image(last, data.eval_dir, log)
    return report


def _silent(*_args, **_kwargs) -> None:
    return None


def chat_about_held_out_image(model_dir: Path, eval_dir: Path, log=print) -> str:
    """Ask the final model the first held-out colour question through the ``mono chat`` command line (its entry
    point, run in this process: the modules it needs are loaded already)."""
    from mono.cli import main as mono_main

    record = json.loads((eval_dir / "colour.jsonl").read_text().splitlines()[0])
    image = eval_dir / record["image"]
    argv = ["chat", "--model", str(model_dir), "--image", str(image), record["question"], "--max-new-tokens", "32",
            "--max-tiles", "4"]
    log(f"$ mono chat --model {model_dir} --image {image} {record['question']!r}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = mono_main(argv)
    if code != 0:
        raise RuntimeError(f"mono {' '.join(argv)} exited with {code}")
    answer = out.getvalue().strip()
    log(f"{answer}\n(expected: {record['answer']})")
    return answer


def main(argv: Optional[Sequence[str]] = None) -> int:
    description = __doc__.split("\n\n")[0]
    code = relaunch(argv, description)  # --ranks > 1 from a plain process: run again under torch.distributed.run
    if code is not None:
        return code
    args, _ = parse(argv, description)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    report = run_demo(args.out, quick=args.quick, ablation=args.ablation)
    close_distributed()  # after an error torch.distributed.run stops the other ranks
    if report is not None:
        print(json.dumps({"report": str(report)}))
    return 0
