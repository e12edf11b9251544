"""``python -m benchmarks.evip_step`` on the CPU with the tiny size: real trainer steps, complete JSON."""

from __future__ import annotations

import json

from benchmarks import evip_step


def test_tiny_run_writes_throughput_json(tmp_path, capsys):
    assert evip_step.main(
        ["--size", "tiny", "--stages", "s1.1", "s2", "--steps", "2", "--warmup", "1", "--samples", "16",
         "--out", str(tmp_path)]
    ) == 0
    (path,) = tmp_path.glob("evip_step_cpu-*_tiny_*.json")
    data = json.loads(path.read_text())
    assert data["git"]["sha"] and [r["stage"] for r in data["results"]] == ["s1.1", "s2"]
    for res in data["results"]:
        assert res["steps"] == 3 and res["tokens_per_s_device/text"] > 0 and res["tokens_per_s_device/visual"] > 0
        assert res["time/step_s"] > 0 and res["mem/peak_gib"] > 0 and "mfu" not in res  # no CPU peak: no MFU
    assert data["results"][0]["trainable_groups"] == ["patch_embed", "projector", "visual_experts"]
    assert "s1.1  tiny: text" in capsys.readouterr().out
