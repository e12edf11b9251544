"""Held-out evaluation: per-task accuracy of greedy chat answers, and exact text perplexity.

``evip eval MODEL_DIR --data EVAL_DIR [--text held_out.txt]`` prints a per-task table and writes JSON. The same
pieces are importable for drivers (the EViP demo evaluates after every stage):

- :func:`load_eval_split` reads an eval folder: ``<task>.jsonl`` files, one record a line,
  ``{"id", "task", "image" (path relative to the folder; absent for text-only), "question", "answer",
  "box" ([x1, y1, x2, y2] in 0-1000 coordinates, grounding only)}``.
- :func:`evaluate_tasks` answers every question greedily through ``model.batch_chat`` (the model's own chat
  template and tiling) and scores it with :func:`score_prediction`.
- :func:`text_perplexity` is exact next-token perplexity on text only, for a :class:`~mono.MonoInternVL` or a
  plain causal LM (``mono.internlm2.InternLM2ForCausalLM``): the number that must stay bit-identical while the
  LLM is frozen (S1.1, S1.2).

Scoring rules (:func:`score_prediction`): answers match after :func:`normalize_answer` (lower case, whitespace
collapsed, trailing punctuation dropped; for counting and digit tasks number words become numerals, so
``"three" == "3"``). Grounding compares the first box of the prediction (:func:`parse_box`) with the expected
box: correct when IoU >= 0.5; a missing or garbled box has IoU 0.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .answers import normalize_answer

__all__ = [
    "EvalDataError", "EvalRecord", "evaluate_tasks", "format_results", "iou", "load_eval_split", "main",
    "normalize_answer", "parse_box", "read_text_file", "score_prediction", "text_nll", "text_perplexity",
]

GROUNDING_TASKS = frozenset({"grounding"})
NUMERIC_TASKS = frozenset({"count", "counting", "digit", "digits"})
IOU_THRESHOLD = 0.5
_NUMBER = r"-?\d+(?:\.\d+)?"
# One box: two opening brackets (spaces allowed between), four numbers, one closing bracket. A fifth number or a
# missing coordinate fails the match, which is what "garbled" means. `[[a,b,c,d],[e,f,g,h]]` (several boxes for
# one phrase, InternVL's format) matches its first box.
_BOX_RE = re.compile(r"\[\s*\[\s*" + r"\s*,\s*".join([f"({_NUMBER})"] * 4) + r"\s*\]")


class EvalDataError(ValueError):
    """An eval folder or record is unusable; the message names the file, line and what to fix."""


@dataclass(frozen=True)
class EvalRecord:
    """One held-out question. ``source`` is ``file:line`` for error messages; ``image`` is resolved."""

    id: str
    task: str
    question: str
    answer: str
    image: Optional[Path]
    box: Optional[tuple[float, float, float, float]]
    source: str


# ============================================================================================== scoring
def parse_box(text: str) -> Optional[tuple[float, float, float, float]]:
    """The first ``[[x1, y1, x2, y2]]`` box in ``text`` (spaces tolerated), or None when there is none.

    ``<box>`` / ``</box>`` are special tokens, which ``batch_chat`` drops when decoding (as the release does), so
    a bare ``[[...]]`` counts; when a ``<box>`` tag is present the box after it is taken.
    """
    tag = text.find("<box>")
    match = _BOX_RE.search(text, tag if tag >= 0 else 0)
    if match is None:
        return None
    x1, y1, x2, y2 = (float(v) for v in match.groups())
    return (x1, y1, x2, y2)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes; 0 when either has no area (inverted corners)."""
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def score_prediction(record: EvalRecord, prediction: str) -> dict[str, Any]:
    """``{"correct": bool}``, plus ``"iou"`` for grounding records (0.0 when the prediction has no valid box)."""
    if record.box is not None:
        box = parse_box(prediction)
        overlap = iou(box, record.box) if box is not None else 0.0
        return {"correct": overlap >= IOU_THRESHOLD, "iou": overlap}
    numeric = record.task in NUMERIC_TASKS
    expected = normalize_answer(record.answer, numeric=numeric)
    return {"correct": normalize_answer(prediction, numeric=numeric) == expected}


# ============================================================================================== data
def _parse_record(raw: Any, eval_dir: Path, source: str, default_task: str) -> EvalRecord:
    if not isinstance(raw, dict):
        raise EvalDataError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    for key in ("id", "question", "answer"):
        if key not in raw:
            raise EvalDataError(f"{source}: missing key {key!r} (records need id, task, question, answer)")
    task = str(raw.get("task", default_task))
    image = None
    if raw.get("image") is not None:
        image = eval_dir / str(raw["image"])
        if not image.is_file():
            raise EvalDataError(f"{source}: image {str(raw['image'])!r} not found at {image}")
    box = raw.get("box")
    if box is None and task in GROUNDING_TASKS:
        box = parse_box(str(raw["answer"]))  # the expected answer may carry the box itself
        if box is None:
            raise EvalDataError(f"{source}: grounding record {raw['id']!r} has no 'box' and no [[x1,y1,x2,y2]] answer")
    if box is not None:
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise EvalDataError(f"{source}: 'box' must be [x1, y1, x2, y2] numbers in 0-1000, got {box!r}")
        box = tuple(float(v) for v in box)
    return EvalRecord(str(raw["id"]), task, str(raw["question"]), str(raw["answer"]), image, box, source)


def load_eval_split(eval_dir: str | Path, *, limit: Optional[int] = None) -> dict[str, list[EvalRecord]]:
    """Records of every ``*.jsonl`` file in ``eval_dir`` grouped by task (tasks sorted, file order kept).

    ``limit`` keeps the first N records of each task. A record's ``task`` defaults to its file's stem. Files whose
    name starts with ``_`` (e.g. ``_ground_truth.jsonl``) are metadata and are not read.

    Raises:
        EvalDataError: the folder is missing or holds no ``.jsonl`` file, a line is not JSON, a key is missing, an
            image file does not exist, a box is malformed, or two records of a task share an id.
    """
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise EvalDataError(f"eval folder {eval_dir} does not exist")
    files = sorted(p for p in eval_dir.glob("*.jsonl") if not p.name.startswith("_"))  # _*.jsonl: metadata
    if not files:
        raise EvalDataError(f"eval folder {eval_dir} holds no <task>.jsonl files")
    by_task: dict[str, list[EvalRecord]] = {}
    for path in files:
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                source = f"{path}:{line_no}"
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EvalDataError(f"{source}: not valid JSON ({exc.msg})") from exc
                record = _parse_record(raw, eval_dir, source, path.stem)
                by_task.setdefault(record.task, []).append(record)
    for task, records in by_task.items():
        seen: dict[str, str] = {}
        for r in records:
            if r.id in seen:
                raise EvalDataError(f"{r.source}: id {r.id!r} of task {task!r} already used at {seen[r.id]}")
            seen[r.id] = r.source
    return {task: by_task[task][:limit] if limit is not None else by_task[task] for task in sorted(by_task)}


# ============================================================================================== accuracy
@torch.no_grad()
def evaluate_tasks(
    model,
    tokenizer,
    eval_dir: str | Path,
    *,
    max_tiles: int,
    image_size: Optional[int] = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    limit: Optional[int] = None,
    num_examples: int = 3,
    progress: str = "auto",
    distributed: bool = False,
) -> dict[str, Any]:
    """Answer every question of ``eval_dir`` greedily and score it per task.

    Images are tiled like the model's own preprocessing (``load_image`` with the config's tile size, minimum
    tiles, thumbnail and dynamic setting) with at most ``max_tiles`` tiles; ``image_size`` overrides the tile
    size. Questions go through ``model.batch_chat`` in batches of ``batch_size`` (left-padded, ``do_sample``
    off), so the prompt is the model's chat template with ``<image>\\n`` in front of image questions.

    Returns ``{"tasks": {task: {"accuracy", "correct", "total", "mean_iou" (grounding), "examples"}},
    "overall": {"accuracy", "correct", "total"}, "settings": {...}, "seconds": float}``; ``examples`` holds the
    first ``num_examples`` predictions of each task with their expected answers. ``progress`` is
    ``auto`` / ``on`` / ``off`` for a progress bar on stderr.

    With ``distributed`` every rank of the initialised process group calls this with its copy of the model: rank r
    answers batches r, r + world, ... and the ranks exchange their answers, so each returns the full result, from
    the same batches one process would form.
    """
    from mono.processing import load_image

    from .metrics import Progress

    if batch_size < 1 or max_tiles < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size, max_tiles and max_new_tokens must be >= 1 "
                         f"(got {batch_size}, {max_tiles}, {max_new_tokens})")
    config = model.config
    size = int(image_size or config.image_size)
    min_tiles = min(config.min_dynamic_patch, max_tiles)
    splits = load_eval_split(eval_dir, limit=limit)
    records = [r for task_records in splits.values() for r in task_records]
    generation = dict(max_new_tokens=max_new_tokens, do_sample=False)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    starts = list(range(0, len(records), batch_size))
    mine = starts[rank::world]
    answered: dict[int, list[str]] = {}  # batch start -> answers
    try:
        with Progress(sum(len(records[s:s + batch_size]) for s in mine), mode=progress, desc="eval") as bar:
            for start in mine:
                batch = records[start:start + batch_size]
                tiles, counts = [], []
                for r in batch:
                    if r.image is None:
                        counts.append(0)
                        continue
                    pixels = load_image(r.image, image_size=size, min_num=min_tiles, max_num=max_tiles,
                                        use_thumbnail=config.use_thumbnail, dynamic=config.dynamic_image_size)
                    tiles.append(pixels)
                    counts.append(pixels.shape[0])
                pixel_values = torch.cat(tiles) if tiles else None
                answers = model.batch_chat(tokenizer, pixel_values, counts, [r.question for r in batch], generation)
                if len(answers) != len(batch):  # zip() below would silently drop the unanswered records
                    raise RuntimeError(f"batch_chat returned {len(answers)} answers for {len(batch)} questions "
                                       f"(from {batch[0].source})")
                answered[start] = answers
                bar.update(sum(map(len, answered.values())))
    finally:
        model.train(was_training)
    if world > 1:
        gathered: list[Optional[dict[int, list[str]]]] = [None] * world
        dist.all_gather_object(gathered, answered)
        answered = {start: answers for part in gathered for start, answers in part.items()}
    predictions = [prediction for start in starts for prediction in answered[start]]

    tasks: dict[str, dict[str, Any]] = {}
    for r, prediction in zip(records, predictions):
        score = score_prediction(r, prediction)
        entry = tasks.setdefault(r.task, {"correct": 0, "total": 0, "examples": [], "_ious": []})
        entry["correct"] += int(score["correct"])
        entry["total"] += 1
        if "iou" in score:
            entry["_ious"].append(score["iou"])
        if len(entry["examples"]) < num_examples:
            entry["examples"].append({"id": r.id, "question": r.question, "answer": r.answer,
                                      "prediction": prediction, **score})
    for entry in tasks.values():
        entry["accuracy"] = entry["correct"] / entry["total"]
        ious = entry.pop("_ious")
        if ious:
            entry["mean_iou"] = sum(ious) / len(ious)
    correct = sum(e["correct"] for e in tasks.values())
    return {
        "tasks": tasks,
        "overall": {"accuracy": correct / len(records) if records else 0.0, "correct": correct, "total": len(records)},
        "settings": {"eval_dir": str(eval_dir), "max_tiles": max_tiles, "image_size": size, "batch_size": batch_size,
                     "max_new_tokens": max_new_tokens, "limit": limit},
        "seconds": time.perf_counter() - started,
    }


# ============================================================================================== perplexity
def _llm_config(model):
    # MonoInternVL keeps the decoder's config under llm_config; a plain causal LM is its own decoder.
    return getattr(model.config, "llm_config", model.config)


@torch.no_grad()
def text_nll(model, tokenizer, texts: Sequence[str], seq_len: int, *, batch_size: int = 8) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats, float64) and the number of predicted tokens.

    Each text is tokenized on its own with the tokenizer's special tokens (BOS where it adds one, as InternLM2's
    does) and cut into windows of ``seq_len`` tokens that overlap by one, so every token after the first is
    predicted exactly once, with at most ``seq_len - 1`` tokens of context and never across texts. Full windows
    run in batches of ``batch_size``, shorter tails one by one: no padding, no attention mask, so a
    :class:`~mono.MonoInternVL` (text only: every position takes the text expert) and a plain causal LM run the
    same decoder computation. Per-token cross entropy is taken on fp32 logits and summed in float64 in a fixed
    order: identical weights give the identical number.

    Raises:
        ValueError: the model has non-fp32 parameters, ``seq_len`` < 2 or beyond the model's context, or no
            text has two tokens.
    """
    if isinstance(texts, str):
        texts = [texts]
    if seq_len < 2:
        raise ValueError(f"perplexity needs seq_len >= 2 (one prediction takes two tokens), got {seq_len}")
    from mono.internlm2 import max_context_length

    context = max_context_length(_llm_config(model))
    if seq_len > context:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context of {context} tokens; lower seq_len")
    odd = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if odd:
        raise ValueError(f"perplexity is measured in fp32 but the model has {', '.join(odd)} parameters; "
                         "call model.float() first")
    full: list[list[int]] = []
    tails: list[list[int]] = []
    for ids in tokenizer(list(texts))["input_ids"] if texts else []:
        for start in range(0, max(len(ids) - 1, 0), seq_len - 1):
            window = ids[start:start + seq_len]
            (full if len(window) == seq_len else tails).append(window)
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[t] for t in tails]
    if not batches:
        raise ValueError("perplexity got no text with at least two tokens")
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            ids_BL = torch.tensor(batch, dtype=torch.long, device=device)
            logits_BLV = model(input_ids=ids_BL).logits
            nll_N = F.cross_entropy(logits_BLV[:, :-1].float().reshape(-1, logits_BLV.shape[-1]),
                                    ids_BL[:, 1:].reshape(-1), reduction="none")
            total += float(nll_N.double().sum())
            count += nll_N.numel()
    finally:
        model.train(was_training)
    return total, count


def text_perplexity(model, tokenizer, texts: Sequence[str], seq_len: int, *, batch_size: int = 8) -> float:
    """Exact fp32 perplexity ``exp(mean next-token NLL)`` over ``texts``; windows and exactness: :func:`text_nll`.

    Works for a :class:`~mono.MonoInternVL` and for any fp32 causal LM whose ``model(input_ids=...)`` returns
    ``.logits`` (``mono.internlm2.InternLM2ForCausalLM``, an HF Llama); the train/eval mode is restored.
    """
    total, count = text_nll(model, tokenizer, texts, seq_len, batch_size=batch_size)
    return math.exp(total / count)


def read_text_file(path: str | Path) -> list[str]:
    """A held-out text file as a list of paragraphs (blocks separated by blank lines, inner newlines kept)."""
    content = Path(path).read_text(encoding="utf-8")
    return [p.strip("\n") for p in re.split(r"\n\s*\n", content) if p.strip()]


# ============================================================================================== command line
def format_results(results: Optional[dict[str, Any]], perplexity: Optional[dict[str, Any]] = None) -> str:
    """The table ``evip eval`` prints: one row per task (n, accuracy, mean IoU), overall, then perplexity."""
    lines = []
    if results is not None:
        width = max([len("overall")] + [len(t) for t in results["tasks"]])
        lines.append(f"{'task':<{width}}  {'n':>6}  {'accuracy':>8}  {'mean IoU':>8}")
        rows = list(results["tasks"].items()) + [("overall", results["overall"])]
        for name, entry in rows:
            mean_iou = f"{entry['mean_iou']:.3f}" if "mean_iou" in entry else ""
            lines.append(f"{name:<{width}}  {entry['total']:>6}  {100 * entry['accuracy']:>7.1f}%  {mean_iou:>8}")
    if perplexity is not None:
        lines.append(f"text perplexity {perplexity['perplexity']:.6g} ({perplexity['tokens']} tokens, "
                     f"windows of {perplexity['seq_len']})")
    return "\n".join(lines)


def _load_model(model_dir: Path, dtype: torch.dtype, device: str):
    """A Mono folder as (MonoInternVL, tokenizer); a plain LLM folder / .gguf as (InternLM2ForCausalLM, tokenizer)."""
    from mono import MonoInternVL
    from mono.configuration import RELEASE_ARCHITECTURE
    from mono.tokenization import load_tokenizer

    config_path = model_dir / "config.json"
    architectures = json.loads(config_path.read_text()).get("architectures", []) if config_path.is_file() else []
    is_mono = RELEASE_ARCHITECTURE in architectures
    if is_mono:
        model = MonoInternVL.from_pretrained(model_dir, dtype=dtype)
        tokenizer = load_tokenizer(model_dir)
    else:
        # A plain decoder (the base LM before S1.1): read through the same adapter from_llm uses.
        from mono.conversion import load_llm
        from mono.internlm2 import InternLM2ForCausalLM

        llm_config, state = load_llm(model_dir)
        model = InternLM2ForCausalLM(llm_config)
        model.load_state_dict(state, strict=True)
        model.to(dtype)
        tokenizer = load_tokenizer(model_dir, add_missing_special_tokens=False)
    return model.to(device).eval(), tokenizer, is_mono


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evip eval",
                                description="Per-task accuracy on held-out splits and text perplexity.")
    p.add_argument("model_dir", type=Path,
                   help="a Mono HF folder (a stage's export/); a plain LLM folder or .gguf for --text only")
    p.add_argument("--data", type=Path, help="eval folder of <task>.jsonl files")
    p.add_argument("--text", type=Path, help="held-out text file (paragraphs separated by blank lines) for perplexity")
    p.add_argument("--max-tiles", type=int, help="tile cap per image (default: the model's max_dynamic_patch)")
    p.add_argument("--image-size", type=int, help="tile size in pixels (default: the model's force_image_size)")
    p.add_argument("--limit", type=int, help="evaluate the first N records of each task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512, help="perplexity window (capped at the model's context)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``evip eval``: 0 on success, 2 on a usage or data error (the message says which and where)."""
    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse exits on bad usage and on --help; report it as a return code
        return int(exc.code or 0)

    def usage(message: str) -> int:
        print(f"evip eval: {message}", file=sys.stderr)
        return 2

    if args.data is None and args.text is None:
        return usage("nothing to evaluate: pass --data EVAL_DIR and/or --text FILE")
    if not args.model_dir.exists():
        return usage(f"model {args.model_dir} does not exist; pass a stage's export/ folder")
    if args.data is not None and not args.data.is_dir():
        return usage(f"--data {args.data} is not a folder of <task>.jsonl files")
    if args.text is not None and not args.text.is_file():
        return usage(f"--text {args.text} is not a file")
    for name in ("max_tiles", "image_size", "limit", "batch_size", "max_new_tokens", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return usage(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    try:
        model, tokenizer, is_mono = _load_model(args.model_dir, getattr(torch, args.dtype), args.device)
    except (OSError, ValueError) as exc:
        return usage(f"cannot load {args.model_dir}: {exc}")
    if args.data is not None and not is_mono:
        return usage(f"{args.model_dir} is a plain LLM (no vision); --data needs a Mono model folder")

    output: dict[str, Any] = {"model": str(args.model_dir), "dtype": args.dtype}
    try:
        if args.data is not None:
            max_tiles = args.max_tiles or model.config.max_dynamic_patch
            output["accuracy"] = evaluate_tasks(
                model, tokenizer, args.data, max_tiles=max_tiles, image_size=args.image_size,
                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
                progress=args.progress,
            )
        if args.text is not None:
            from mono.internlm2 import max_context_length

            seq_len = min(args.seq_len, max_context_length(_llm_config(model)))
            model.float()  # perplexity is an fp32 figure even when the answers were generated in bf16
            nll, count = text_nll(model, tokenizer, read_text_file(args.text), seq_len, batch_size=args.batch_size)
            output["text"] = {"file": str(args.text), "perplexity": math.exp(nll / count), "nll": nll,
                              "tokens": count, "seq_len": seq_len}
    except EvalDataError as exc:
        return usage(str(exc))
    except ValueError as exc:  # e.g. an unreadable image (ImageError) or a text file with no tokens
        return usage(str(exc))
    print(format_results(output.get("accuracy"), output.get("text")))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(output, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
