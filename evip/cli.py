"""The ``evip`` command: ``evip train``, ``evip run``, ``evip data check``, ``evip eval``.

    evip train configs/evip/smoke/s1_1.yaml schedule.steps=20       one stage
    evip run configs/evip/smoke/recipe.yaml                           the whole chain
    evip data check data/meta.json --tokenizer path/to/tokenizer      validate a dataset offline
    evip eval runs/x/s2/export --data eval/ --text held_out.txt      held-out accuracy + perplexity
    torchrun --nproc_per_node 8 -m evip.cli train stage.yaml          several processes (same for run)
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

from .config import ConfigError

USAGE = __doc__


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            from .train import main as run
        elif command == "run":
            from .recipe import main as run
        elif command == "data" and rest[:1] == ["check"]:
            from .data.check import main as run

            rest = rest[1:]
        elif command == "eval":
            from .eval import main as run
        else:
            print(f"evip: unknown command {' '.join(argv[:2])!r}\n{USAGE}", file=sys.stderr)
            return 2
        return int(run(rest) or 0)
    except ConfigError as exc:
        print(f"evip {command}: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
