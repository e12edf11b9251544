"""``python -m evip.demo``: see :mod:`evip.demo.pipeline` (the relaunch under torchrun happens first, before the
pipeline's heavy imports)."""

import sys

from .launch import relaunch

code = relaunch()
if code is None:
    from .pipeline import main

    code = main()
sys.exit(code)
