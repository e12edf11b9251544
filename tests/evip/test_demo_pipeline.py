"""The shortened demo end to end (`python -m evip.demo --quick`): data, base LM, four stages, evaluation after each,
report; the language model's text perplexity is bit-identical through S1.1 and S1.2 and changes after S2."""

from __future__ import annotations

import json

import pytest
import yaml

from evip.demo.pipeline import run_demo

pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_stage_and_reports(tmp_path):
    report = run_demo(tmp_path, quick=True, log=lambda line: None)
    assert report.is_file()
    results = json.loads((report.parent / "results.json").read_text())
    text = report.read_text()
    runs = ("s1.1", "s1.2", "s1.3-shapes", "s1.3", "s2")  # S1.3 in two phases: shape questions first, then the mixture
    assert list(results["results_per_stage"]) == list(runs)
    for run in runs:
        assert run in text and (tmp_path / "runs" / "evip" / run / "export" / "config.json").is_file()
    final = tmp_path / "runs" / "evip" / "s2" / "export"
    assert json.loads((final / "config.json").read_text())["llm_config"]["visual_attention_experts"] is True
    ppl = results["perplexity_per_stage"]
    assert ppl["s1.1"] == ppl["base"] and ppl["s1.2"] == ppl["base"]  # exact float equality (visual attention
    # experts included: text-only input never reaches them)
    assert ppl["s2"] != ppl["base"]
    assert (report.parent / "loss.png").is_file() and (report.parent / "accuracy.png").is_file()
    assert text.count("bit-identical to base") >= 2


@pytest.mark.distributed
def test_quick_demo_on_two_ranks(tmp_path):
    """`python -m evip.demo --ranks 2` relaunches itself under torch.distributed.run: both ranks train every run
    (replicated data parallel), rank 0 evaluates and reports; the frozen stages still leave text untouched."""
    import os
    import subprocess
    import sys

    from evip.demo.pipeline import ROOT

    cmd = [sys.executable, "-m", "evip.demo", "--quick", "--ranks", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count('{"report": ') == 1  # rank 0 alone reports
    report = tmp_path / "report" / "report.md"
    text = report.read_text()
    assert "training: 2 rank(s) of 1 thread(s) each" in text and text.count("bit-identical to base") >= 2
    results = json.loads((report.parent / "results.json").read_text())
    assert list(results["results_per_stage"]) == ["s1.1", "s1.2", "s1.3-shapes", "s1.3", "s2"]
    for run in results["results_per_stage"]:
        config = yaml.safe_load((tmp_path / "runs" / "evip" / run / "config.yaml").read_text())
        assert config["parallel"]["fsdp"] is False  # replicated, not FSDP2
    assert proc.stdout.count("2 rank(s) on cpu") == 5
    # The ranks answered alternate batches of the held-out questions: the same results as one process.
    import torch

    from evip.eval import evaluate_tasks
    from mono import MonoInternVL
    from mono.tokenization import load_tokenizer

    final = tmp_path / "runs" / "evip" / "s2" / "export"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        alone = evaluate_tasks(MonoInternVL.from_pretrained(final, dtype=torch.float32), load_tokenizer(final),
                               tmp_path / "data" / "eval", max_tiles=4, limit=4, progress="off")
    finally:
        torch.set_num_threads(threads)
    assert results["results_per_stage"]["s2"]["tasks"] == json.loads(json.dumps(alone["tasks"]))
