"""``python -m benchmarks.moe_ffn --quick`` on the CPU: the JSON it writes is complete and consistent, the PNG valid."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from benchmarks import moe_ffn

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"



def test_quick_run_writes_complete_results(tmp_path, capsys, one_thread):
    assert moe_ffn.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (json_path,) = tmp_path.glob("moe_ffn_cpu-*.json")
    (png_path,) = tmp_path.glob("moe_ffn_cpu-*.png")
    assert json_path.stem == png_path.stem
    assert str(json_path) in out and str(png_path) in out
    for mode in moe_ffn.MODES:
        assert f"== {mode}:" in out
    assert "== targets at T=256" in out

    result = json.loads(json_path.read_text())
    for key in ("git", "env", "args", "conventions", "measurements", "cases", "checks", "unavailable", "targets"):
        assert key in result, key
    assert result["env"]["num_threads"] == 1 and result["env"]["torch"] == torch.__version__
    assert result["ours_backend"] == "torch"
    args = result["args"]
    assert args["tokens"] == [64, 256] and args["fractions"] == [0.0, 0.5, 1.0]

    rows = {(r["tokens"], r["vis_fraction"], r["mode"], r["impl"]): r for r in result["measurements"]}
    assert len(rows) == len(result["measurements"])
    for tokens in args["tokens"]:
        for mode in moe_ffn.MODES:
            for fraction in args["fractions"]:
                dense = rows[(tokens, fraction, mode, "dense")]
                assert dense["status"] == "ok" and dense["ratio_to_dense"] == 1.0
                for impl in moe_ffn.IMPLS:
                    r = rows[(tokens, fraction, mode, impl)]
                    if r["status"] == "unavailable":
                        assert r["ms"] is None and r["reason"] and result["unavailable"][impl] == r["reason"]
                        continue
                    assert r["status"] == "ok", r  # not WRONG, not error
                    for key in ("ms", "flops", "tflops", "ratio_to_dense"):
                        assert math.isfinite(r[key]) and r[key] > 0, (key, r)
                    assert r["ratio_to_dense"] == pytest.approx(r["ms"] / dense["ms"])
                    assert r["tflops"] == pytest.approx(r["flops"] / r["ms"] / 1e9)
                    if mode in moe_ffn.DERIVED:
                        base = rows[(tokens, fraction, moe_ffn.DERIVED[mode], impl)]
                        assert r["ms"] == pytest.approx(base["ms"] - rows[(tokens, fraction, "fwd", impl)]["ms"])

    # Everything that can run on a CPU ran; only megablocks (not installable here) may be unavailable.
    assert set(result["unavailable"]) <= {"megablocks"}
    ran = {r["impl"] for r in result["measurements"] if r["status"] == "ok"}
    assert {"dense", "blend", "index_select", "grouped_mm", "ours"} <= ran
    assert all(c["ok"] and c["rel_err"] <= c["tol"] for c in result["checks"])
    assert {c["impl"] for c in result["checks"]} == ran  # every timed impl was checked first

    # FLOP conventions: fwd 6TDF; the frozen text expert removes the text share of the weight gradients.
    tdf = 256 * args["d"] * args["f"]
    assert rows[(256, 0.5, "fwd", "ours")]["flops"] == 6 * tdf
    assert rows[(256, 0.5, "frozen", "ours")]["flops"] == pytest.approx((12 + 6 * 0.5) * tdf)
    assert rows[(256, 0.5, "frozen", "dense")]["ms"] == rows[(256, 0.5, "fwdbwd", "dense")]["ms"]
    assert rows[(256, 0.5, "frozen", "dense")]["flops"] == 18 * tdf

    cases = {(c["tokens"], c["vis_fraction"]): c for c in result["cases"]}
    half = cases[(256, 0.5)]
    assert half["num_visual"] == 128 and sum(length for _, length in half["spans"]) == 128
    assert half["build_routing"]["ms"] > 0

    targets = result["targets"]
    assert targets["tokens"] == 256 and targets["vis_fraction"] == 0.5
    assert {t["verdict"] for t in targets["targets"]} <= {"PASS", "FAIL", "n/a"}

    assert png_path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(png_path) as image:
        image.verify()
    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.size[0] > 500 and image.size[1] > 300


def test_visual_layout_is_contiguous_spans_and_deterministic():
    mask, spans = moe_ffn.visual_layout(1000, 0.5, 256, seed=3)
    again, spans_again = moe_ffn.visual_layout(1000, 0.5, 256, seed=3)
    assert spans == spans_again and (mask == again).all()
    assert [length for _, length in spans] == [256, 244]
    assert int(mask.sum()) == 500
    for start, length in spans:
        assert mask[start:start + length].all()
    assert moe_ffn.visual_layout(64, 0.0, 32, seed=0)[1] == []
    assert moe_ffn.visual_layout(64, 1.0, 32, seed=0)[1] == [[0, 32], [32, 32]]


def test_token_list_accepts_k_suffix():
    from benchmarks.common import parse_tokens

    assert parse_tokens("1k,4K, 16384") == [1024, 4096, 16384]
    with pytest.raises(Exception, match="positive integer"):
        parse_tokens("1.5k")


def test_wrong_output_is_flagged_not_hidden(tmp_path, capsys, monkeypatch, one_thread):
    def build_swapped_experts(c):  # every token through the other modality's expert
        def run():
            text_TD = moe_ffn._swiglu(c.x_TD, c.w1[1], c.w3[1], c.w2[1])
            vis_TD = moe_ffn._swiglu(c.x_TD, c.w1[0], c.w3[0], c.w2[0])
            return text_TD * (1 - c.mask_T1) + vis_TD * c.mask_T1
        return run

    monkeypatch.setitem(moe_ffn.BUILDERS, "blend", build_swapped_experts)
    argv = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--tokens", "64", "--fractions", "0.5",
            "--modes", "fwd,fwdbwd,bwd", "--impls", "blend,ours"]
    assert moe_ffn.main(argv) == 0
    assert "WRONG" in capsys.readouterr().out
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    blend = [r for r in result["measurements"] if r["impl"] == "blend"]
    assert len(blend) == 3 and all(r["status"] == "WRONG" and "relative error" in r["reason"] for r in blend)
    assert all(r["ms"] is not None for r in blend)  # still timed, but flagged
    assert [c["ok"] for c in result["checks"] if c["impl"] == "blend"] == [False]
    ours = [r for r in result["measurements"] if r["impl"] == "ours"]
    assert all(r["status"] == "ok" for r in ours)
