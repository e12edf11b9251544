"""``python -m evip.demo``'s command line, kept light: with ``--ranks`` > 1 the command relaunches itself under
``torch.distributed.run`` before anything heavy is imported (torch, transformers and the pipeline take ~4 s to
import, paid once per process)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]


def build_parser(description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evip.demo", description=description)
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "demo")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the version `make test` runs)")
    parser.add_argument("--ablation", action="store_true", help="also run with delta tuning off")
    parser.add_argument("--ranks", type=int, default=None,
                        help="training processes of one thread each (default: 2 on a machine with 2+ cores, else 1)")
    return parser


def default_ranks() -> int:
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def parse(argv: Optional[Sequence[str]], description: str = "") -> tuple[argparse.Namespace, int]:
    """The parsed arguments and the number of ranks (errors exit through argparse)."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    ranks = default_ranks() if args.ranks is None else args.ranks
    if ranks < 1:
        parser.error(f"--ranks must be >= 1, got {ranks}")
    return args, ranks


def relaunch(argv: Optional[Sequence[str]] = None, description: str = "") -> Optional[int]:
    """Run this command again under ``torch.distributed.run`` with ``--ranks`` processes of one thread each and
    return its exit code; None when this process is to run the demo itself (one rank, or already a rank)."""
    _, ranks = parse(argv, description)
    if ranks == 1 or "LOCAL_RANK" in os.environ:
        return None
    forwarded = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           "-m", "evip.demo", *forwarded]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT).returncode
