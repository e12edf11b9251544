"""Held-out evaluation and the run report: scoring rules, evaluate_tasks on a tiny model (real and with scripted
answers), exact text perplexity, plots, report.md / results.json, and `evip eval` exit codes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from evip.cli import main as evip_main
from evip.eval import (
    EvalDataError, evaluate_tasks, iou, load_eval_split, normalize_answer, parse_box, read_text_file,
    score_prediction, text_perplexity,
)
from evip.report import Ablation, plot_accuracy, plot_losses, write_report
from mono import MonoInternVL
from mono.configuration import PLAIN_LLM_ARCHITECTURE, InternLM2Config
from mono.internlm2 import InternLM2ForCausalLM
from tests.mono.conftest import tiny_chat_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ============================================================================================== scoring
@pytest.mark.parametrize("prediction, answer, numeric, same", [
    ("Red.", "red", False, True),
    ("  BLUE  square!! ", "blue square", False, True),
    ("blue  \n square", "blue square", False, True),
    ("red", "reddish", False, False),
    ("three", "3", True, True),
    ("Three.", "3", True, True),
    ("03", "three", True, True),
    ("twenty-one", "21", True, True),
    ("twenty one", "21", True, True),
    ("zero", "0", True, True),
    ("three", "3", False, False),  # number words count as numerals only for counting / digit tasks
    ("3 cats", "3", True, False),
    ("four", "3", True, False),
])
def test_normalized_exact_match(prediction, answer, numeric, same):
    assert (normalize_answer(prediction, numeric=numeric) == normalize_answer(answer, numeric=numeric)) is same


@pytest.mark.parametrize("text, box", [
    ("<ref>red square</ref><box>[[10,20,300,400]]</box>", (10, 20, 300, 400)),
    ("<box>[[ 10 , 20 ,300, 400 ]]</box>", (10, 20, 300, 400)),
    ("[ [10,20,300,400] ]", (10, 20, 300, 400)),  # <box> is a special token that decoding drops
    ("the red square [[1,2,3,4],[5,6,7,8]]", (1, 2, 3, 4)),  # several boxes: the first
    ("[[0,0,0,0]] then <box>[[5,6,7,8]]</box>", (5, 6, 7, 8)),  # the tagged box wins
    ("[[1.5,2,3,4]]", (1.5, 2, 3, 4)),
    ("<box>[[1,2,3]]</box>", None),
    ("<box>[[1,2,3,4,5]]</box>", None),
    ("<box>[[a,b,c,d]]</box>", None),
    ("<box>[10,20,30,40]</box>", None),
    ("no box at all", None),
    ("", None),
])
def test_parse_box(text, box):
    assert parse_box(text) == box


def test_iou():
    assert iou((0, 0, 100, 100), (0, 0, 100, 100)) == 1.0
    assert iou((0, 0, 100, 100), (50, 0, 150, 100)) == pytest.approx(50 / 150)
    assert iou((0, 0, 100, 100), (200, 200, 300, 300)) == 0.0
    assert iou((0, 0, 100, 100), (100, 0, 200, 100)) == 0.0  # touching edges
    assert iou((100, 100, 0, 0), (0, 0, 100, 100)) == 0.0  # inverted corners: no area
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    assert iou((0, 0, 100, 100), (25, 25, 75, 75)) == pytest.approx(0.25)


# ============================================================================================== eval folder
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}

# (task, image size or None, question, expected answer, wrong answer); questions are unique so a scripted
# batch_chat can answer by question.
CASES = [
    ("colour", (80, 60), "what colour is the shape 0", "red", "blue"),
    ("colour", (56, 56), "what colour is the shape 1", "blue", "green"),
    ("colour", (60, 130), "what colour is the shape 2", "green", ""),
    ("shape", (70, 70), "what shape is it", "circle", "square"),
    ("count", (90, 45), "how many shapes 0", "3", "four"),
    ("count", (90, 45), "how many shapes 1", "two", "3"),
    ("digit", (32, 32), "which digit is this", "7", "one"),
    ("grounding", (120, 80), "where is the red square", "<ref>red square</ref><box>[[100,100,500,600]]</box>",
     "<box>[[600,650,900,950]]</box>"),
    ("grounding", (120, 80), "where is the blue circle", "<box>[[0,0,400,400]]</box>", "<box>[[0,0,400]]</box>"),
    ("caption", (80, 80), "describe the image", "a red square.", "a red"),
    ("text", None, "what is two plus one", "three", "four"),
]


def write_eval_dir(root: Path) -> Path:
    """One <task>.jsonl per task, PNG images of several aspect ratios, one text-only task."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    lines: dict[str, list[str]] = {}
    for i, (task, size, question, answer, _) in enumerate(CASES):
        record = {"id": f"{task}-{i}", "task": task, "question": question, "answer": answer}
        if size is not None:
            Image.new("RGB", size, list(COLOURS.values())[i % 3]).save(root / "images" / f"{i}.png")
            record["image"] = f"images/{i}.png"
        if task == "grounding":
            record["box"] = list(parse_box(answer))
        lines.setdefault(task, []).append(json.dumps(record))
    for task, rows in lines.items():
        (root / f"{task}.jsonl").write_text("\n".join(rows) + "\n")
    return root


def counts_per_task() -> dict[str, int]:
    out: dict[str, int] = {}
    for task, *_ in CASES:
        out[task] = out.get(task, 0) + 1
    return out


@pytest.fixture
def chat_model():
    return tiny_chat_model()


@pytest.fixture
def eval_dir(tmp_path) -> Path:
    return write_eval_dir(tmp_path / "eval")


def test_load_eval_split_groups_by_task_and_limits(eval_dir):
    splits = load_eval_split(eval_dir)
    assert {t: len(r) for t, r in splits.items()} == counts_per_task()
    assert splits["text"][0].image is None and splits["colour"][0].image.is_file()
    assert splits["grounding"][0].box == (100, 100, 500, 600)
    assert {t: len(r) for t, r in load_eval_split(eval_dir, limit=1).items()} == {t: 1 for t in counts_per_task()}


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"id": "x", "question": "q"}', "missing key 'answer'"),
    ('{"id": "x", "question": "q", "answer": "a", "image": "nope.png"}', "not found"),
    ('{"id": "x", "task": "grounding", "question": "q", "answer": "left"}', "no 'box'"),
    ('{"id": "x", "question": "q", "answer": "a", "box": [1, 2, 3]}', "must be \\[x1, y1, x2, y2\\]"),
])
def test_bad_eval_records_name_file_and_line(tmp_path, line, message):
    (tmp_path / "t.jsonl").write_text('{"id": "ok", "question": "q", "answer": "a"}\n' + line + "\n")
    with pytest.raises(EvalDataError, match=message) as info:
        load_eval_split(tmp_path)
    assert "t.jsonl:2" in str(info.value)


def test_duplicate_ids_and_empty_folder_are_errors(tmp_path):
    with pytest.raises(EvalDataError, match="no <task>.jsonl"):
        load_eval_split(tmp_path)
    (tmp_path / "t.jsonl").write_text('{"id": "a", "question": "q", "answer": "x"}\n' * 2)
    with pytest.raises(EvalDataError, match="already used"):
        load_eval_split(tmp_path)


# ============================================================================================== evaluate_tasks
def test_evaluate_tasks_on_a_tiny_model_records_everything(chat_model, eval_dir):
    model, tok = chat_model
    result = evaluate_tasks(model, tok, eval_dir, max_tiles=2, batch_size=4, max_new_tokens=3, num_examples=2,
                            progress="off")
    assert {t: e["total"] for t, e in result["tasks"].items()} == counts_per_task()
    assert result["overall"]["total"] == len(CASES)
    for task, entry in result["tasks"].items():
        assert 0.0 <= entry["accuracy"] <= 1.0 and entry["accuracy"] == entry["correct"] / entry["total"]
        assert len(entry["examples"]) == min(2, entry["total"])
        assert all(isinstance(e["prediction"], str) and "correct" in e for e in entry["examples"])
    assert "mean_iou" in result["tasks"]["grounding"] and "mean_iou" not in result["tasks"]["colour"]
    assert result["settings"]["image_size"] == 56 and result["settings"]["max_tiles"] == 2
    assert not model.training
    json.dumps(result)  # the CLI and the report write it as JSON


def scripted_batch_chat(model, monkeypatch, answer_of: dict[str, str], max_tiles: int, calls: list):
    """Replace batch_chat by a scripted one that checks what evaluate_tasks passes and answers by question."""
    def fake(tokenizer, pixel_values, image_counts, questions, generation_config):
        assert generation_config["do_sample"] is False
        assert sum(image_counts) == (0 if pixel_values is None else pixel_values.shape[0])
        for question, count in zip(questions, image_counts):
            has_image = next(size for _, size, q, *_ in CASES if q == question) is not None
            assert (count > 0) == has_image and count <= max_tiles + 1  # + the thumbnail
        if pixel_values is not None:
            assert tuple(pixel_values.shape[1:]) == (3, 56, 56)
        calls.append(len(questions))
        return [answer_of[q] for q in questions]

    monkeypatch.setattr(model, "batch_chat", fake)


@pytest.mark.parametrize("perfect", [True, False])
def test_a_perfect_model_scores_one_and_a_wrong_one_zero(chat_model, eval_dir, monkeypatch, perfect):
    model, tok = chat_model
    # The perfect answers are written the way a model would say them, not copied from the file: other case,
    # number words for numerals and back, the box without its (dropped) special tokens.
    perfect_answers = {"3": "Three", "two": "2", "7": "seven.", "a red square.": "A red square"}
    answer_of = {}
    for task, _, question, answer, wrong in CASES:
        right = perfect_answers.get(answer, answer.upper() if task in ("colour", "shape") else answer)
        if task == "grounding":
            right = "the square " + answer.replace("<box>", "").replace("</box>", "")
        answer_of[question] = right if perfect else wrong
    calls: list[int] = []
    scripted_batch_chat(model, monkeypatch, answer_of, max_tiles=3, calls=calls)
    result = evaluate_tasks(model, tok, eval_dir, max_tiles=3, batch_size=4, progress="off")
    expected = 1.0 if perfect else 0.0
    assert {t: e["accuracy"] for t, e in result["tasks"].items()} == {t: expected for t in counts_per_task()}
    assert result["tasks"]["grounding"]["mean_iou"] == pytest.approx(expected)
    assert calls == [4, 4, 3]  # batches of batch_size, the last one shorter
    assert result["overall"]["accuracy"] == expected


def test_grounding_iou_threshold_and_mean(chat_model, tmp_path, monkeypatch):
    model, tok = chat_model
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    rows = [{"id": str(i), "task": "grounding", "image": "a.png", "question": f"where {i}", "answer": "",
             "box": [0, 0, 100, 100]} for i in range(3)]
    (tmp_path / "grounding.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    # IoU 0.5 exactly (counts), IoU 1/3 (does not), garbled (0).
    answers = {"where 0": "[[0, 0, 50, 100]]", "where 1": "[[50,0,150,100]]", "where 2": "[[0,0,100]]"}
    monkeypatch.setattr(model, "batch_chat", lambda tok_, pv, counts, qs, gen: [answers[q] for q in qs])
    entry = evaluate_tasks(model, tok, tmp_path, max_tiles=1, progress="off")["tasks"]["grounding"]
    assert entry["correct"] == 1 and entry["total"] == 3
    assert entry["mean_iou"] == pytest.approx((0.5 + 1 / 3 + 0.0) / 3)
    assert [e["iou"] for e in entry["examples"]] == pytest.approx([0.5, 1 / 3, 0.0])


def test_score_prediction_uses_numbers_only_for_numeric_tasks(eval_dir):
    splits = load_eval_split(eval_dir)
    assert score_prediction(splits["count"][0], "three")["correct"]
    assert not score_prediction(splits["text"][0], "3")["correct"]  # "three" expected, task not numeric


# ============================================================================================== perplexity
TEXTS = ["hello world how are you", "fine thanks", "what is in the image a cat dog red blue one two three"]


def test_text_perplexity_is_exp_mean_cross_entropy(chat_model):
    model, tok = chat_model
    encoded = [torch.tensor(tok(t)["input_ids"]) for t in TEXTS]
    assert all(int(ids[0]) == tok.bos_token_id for ids in encoded)

    def nll_sum(ids):
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0]
        return F.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum").item()

    # Windows longer than every text: each text is one sequence, every token after BOS predicted once.
    by_hand = math.exp(sum(nll_sum(ids) for ids in encoded) / sum(len(ids) - 1 for ids in encoded))
    assert text_perplexity(model, tok, TEXTS, seq_len=64) == pytest.approx(by_hand, rel=1e-6)

    # Windows of 4 overlapping by one token: [0:4], [3:7], ...; the last text (13 tokens) ends in a short tail.
    total, count = 0.0, 0
    for ids in encoded:
        for start in range(0, len(ids) - 1, 3):
            total += nll_sum(ids[start:start + 4])
            count += len(ids[start:start + 4]) - 1
    assert count == sum(len(ids) - 1 for ids in encoded)
    windows = text_perplexity(model, tok, TEXTS, seq_len=4, batch_size=2)
    assert windows == pytest.approx(math.exp(total / count), rel=1e-6)
    assert text_perplexity(model, tok, TEXTS, seq_len=4) != text_perplexity(model, tok, TEXTS, seq_len=64)


def test_text_perplexity_is_deterministic_and_equal_for_plain_and_mono(chat_model):
    _, tok = chat_model
    config = InternLM2Config(architectures=[PLAIN_LLM_ARCHITECTURE], vocab_size=len(tok), hidden_size=64,
                             intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    llm = InternLM2ForCausalLM(config).eval()
    mono = MonoInternVL.from_llm(llm, tokenizer=tok, image_size=56).eval()
    first = text_perplexity(llm, tok, TEXTS, seq_len=8)
    assert text_perplexity(llm, tok, TEXTS, seq_len=8) == first
    # The frozen-LLM claim of S1.1 / S1.2: a Mono model around the LLM gives the very same float on text.
    assert text_perplexity(mono, tok, TEXTS, seq_len=8) == first
    with torch.no_grad():
        llm.output.weight[0, 0] += 1e-3
    assert text_perplexity(llm, tok, TEXTS, seq_len=8) != first


def test_text_perplexity_of_a_hugging_face_llama(chat_model):
    # transformers 5 reports an unscaled Llama RoPE as {"rope_type": "default", ...} with no factor.
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = chat_model
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    llm = LlamaForCausalLM(config).eval()
    ids = torch.tensor(tok(TEXTS[0])["input_ids"])
    with torch.no_grad():
        by_hand = F.cross_entropy(llm(input_ids=ids[None]).logits[0, :-1].double(), ids[1:]).exp().item()
    assert text_perplexity(llm, tok, TEXTS[:1], seq_len=64) == pytest.approx(by_hand, rel=1e-6)
    with pytest.raises(ValueError, match="context of 64 tokens"):
        text_perplexity(llm, tok, TEXTS, seq_len=65)


def test_text_perplexity_errors(chat_model):
    model, tok = chat_model
    with pytest.raises(ValueError, match="exceeds the model's context"):
        text_perplexity(model, tok, TEXTS, seq_len=10_000)
    with pytest.raises(ValueError, match=">= 2"):
        text_perplexity(model, tok, TEXTS, seq_len=1)
    with pytest.raises(ValueError, match="at least two tokens"):
        text_perplexity(model, tok, [""], seq_len=8)
    with pytest.raises(ValueError, match="fp32"):
        text_perplexity(model.to(torch.bfloat16), tok, TEXTS, seq_len=8)


def test_read_text_file_splits_paragraphs(tmp_path):
    (tmp_path / "t.txt").write_text("one\ntwo\n\n\nthree\n  \nfour\n")
    assert read_text_file(tmp_path / "t.txt") == ["one\ntwo", "three", "four"]


# ============================================================================================== report
STAGES = ["s1.1", "s1.2", "s1.3", "s2"]


def fake_result(accuracies: dict[str, float], total: int = 10) -> dict:
    tasks = {t: {"accuracy": a, "correct": round(a * total), "total": total, "examples": []}
             for t, a in accuracies.items()}
    if "grounding" in tasks:
        tasks["grounding"]["mean_iou"] = 0.42
    correct = sum(e["correct"] for e in tasks.values())
    return {"tasks": tasks, "overall": {"accuracy": correct / (total * len(tasks)), "correct": correct,
                                        "total": total * len(tasks)}}


def write_runs(root: Path, offset: float = 0.0) -> dict[str, Path]:
    runs = {}
    for k, stage in enumerate(STAGES):
        folder = root / stage
        folder.mkdir(parents=True)
        rows = [{"step": s, "loss": 5.0 - 0.1 * s + offset + k, "loss_step": 5.1 - 0.1 * s + offset}
                for s in range(1, 21)]
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        runs[stage] = folder
    return runs


def is_png(path: Path) -> bool:
    with Image.open(path) as im:
        im.load()
        return path.read_bytes()[:8] == PNG_MAGIC and im.width > 100 and im.height > 100


def results_per_stage(scale: float) -> dict[str, dict]:
    return {s: fake_result({"colour": min(1.0, scale * (i + 1) / 4), "count": 0.1 * i, "grounding": 0.2 * i})
            for i, s in enumerate(STAGES)}


def test_plots_are_png_files(tmp_path):
    runs = write_runs(tmp_path / "runs")
    assert is_png(plot_losses(runs, tmp_path / "loss.png"))
    ablation = Ablation("delta tuning off", results_per_stage(0.5), stage_runs=write_runs(tmp_path / "abl", 0.5))
    assert is_png(plot_losses(runs, tmp_path / "loss_ab.png", ablation=ablation))
    assert is_png(plot_accuracy(results_per_stage(1.0), tmp_path / "acc.png"))
    assert is_png(plot_accuracy(results_per_stage(1.0), tmp_path / "acc_ab.png", ablation=ablation))
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_losses({"s1.1": tmp_path / "missing"}, tmp_path / "x.png")


def test_report_mentions_every_stage_task_and_marks_bit_identical_perplexity(tmp_path):
    runs = write_runs(tmp_path / "runs")
    ppl = {"base": 12.345678901234, "s1.1": 12.345678901234, "s1.2": 12.345678901234, "s1.3": 12.4, "s2": 12.9}
    ablation = Ablation("delta tuning off", results_per_stage(0.5),
                        {"base": 12.345678901234, "s1.1": 13.5, "s1.2": 14.0, "s1.3": 14.2, "s2": 14.1},
                        write_runs(tmp_path / "abl", 0.5), {"s1.1": 1.0, "s1.2": 1.0, "s1.3": 1.0, "s2": 1.0})
    timings = {"data": 30.0, "base LM": 60.0, "s1.1": 50.0, "s1.2": 20.0, "s1.3": 20.0, "s2": 20.0}
    report = write_report(tmp_path / "out", results_per_stage(1.0), ppl, timings, ["measured on 2 cores"],
                          stage_runs=runs, ablation=ablation)
    text = report.read_text()
    for name in STAGES + ["colour", "count", "grounding", "grounding mean IoU", "delta tuning off",
                          "measured on 2 cores"]:
        assert name in text, name
    section = text.split("## Text perplexity")[1].split("##")[0]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    assert "bit-identical" in rows["s1.1"].split("|")[2] and "bit-identical" in rows["s1.2"].split("|")[2]
    assert "bit-identical" not in rows["s1.3"] and "bit-identical" not in rows["s2"]
    assert "bit-identical" not in rows["s1.1"].split("|")[3]  # the ablation's LLM moved
    assert "| s1.1 | 50.0 | 50s | 25.0% |" in text and "| **total** | 200.0 |" in text
    for link in ("loss.png", "accuracy.png", "results.json"):
        assert f"({link})" in text and (report.parent / link).is_file()
    assert is_png(report.parent / "loss.png") and is_png(report.parent / "accuracy.png")
    data = json.loads((report.parent / "results.json").read_text())
    assert data["perplexity_per_stage"] == ppl  # exact floats survive JSON
    assert data["bit_identical_to_base"] == {"s1.1": True, "s1.2": True, "s1.3": False, "s2": False}
    assert data["ablation"]["results_per_stage"]["s2"]["tasks"]["colour"]["accuracy"] == 0.5
    assert data["timings"] == timings and data["notes"] == ["measured on 2 cores"]


# ============================================================================================== command line
def test_evip_eval_cli(chat_model, eval_dir, tmp_path, capsys):
    model, tok = chat_model
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    text = tmp_path / "held_out.txt"
    text.write_text("hello world how are you\n\nfine thanks\n")
    out = tmp_path / "res" / "results.json"
    args = ["eval", str(model_dir), "--data", str(eval_dir), "--text", str(text), "--out", str(out),
            "--max-tiles", "2", "--max-new-tokens", "2", "--batch-size", "3", "--progress", "off"]
    assert evip_main(args) == 0
    printed = capsys.readouterr().out
    assert all(task in printed for task in counts_per_task()) and "text perplexity" in printed
    data = json.loads(out.read_text())
    assert {t: e["total"] for t, e in data["accuracy"]["tasks"].items()} == counts_per_task()
    reloaded = MonoInternVL.from_pretrained(model_dir)
    paragraphs = ["hello world how are you", "fine thanks"]
    assert data["text"]["perplexity"] == text_perplexity(reloaded, tok, paragraphs, data["text"]["seq_len"])

    (eval_dir / "bad.jsonl").write_text('{"id": "x"}\n')
    assert evip_main(["eval", str(model_dir), "--data", str(eval_dir)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_evip_eval_cli_usage_errors(tmp_path, eval_dir, capsys):
    assert evip_main(["eval", str(tmp_path / "missing"), "--data", str(eval_dir)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert evip_main(["eval", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err
    assert evip_main(["eval", str(tmp_path), "--data", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert evip_main(["eval", str(tmp_path), "--text", str(tmp_path / "nope.txt")]) == 2
    assert evip_main(["eval", str(tmp_path), "--data", str(eval_dir), "--limit", "0"]) == 2
    assert evip_main(["eval"]) == 2  # model_dir missing (argparse)
    assert evip_main(["eval", "--help"]) == 0


def test_evip_eval_cli_on_a_plain_llm_measures_text_only(chat_model, eval_dir, tmp_path, capsys):
    _, tok = chat_model
    config = InternLM2Config(architectures=[PLAIN_LLM_ARCHITECTURE], vocab_size=len(tok), hidden_size=32,
                             intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    llm = InternLM2ForCausalLM(config).eval()
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    text = tmp_path / "held_out.txt"
    text.write_text("hello world how are you\n\nfine thanks\n")
    out = tmp_path / "base.json"
    assert evip_main(["eval", str(tmp_path / "llm"), "--text", str(text), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["text"]["seq_len"] == 64  # --seq-len 512 capped at the model's context
    assert data["text"]["perplexity"] == text_perplexity(llm, tok, ["hello world how are you", "fine thanks"], 64)
    assert evip_main(["eval", str(tmp_path / "llm"), "--data", str(eval_dir)]) == 2
    assert "plain LLM" in capsys.readouterr().err
