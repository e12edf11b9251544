"""``python -m evip.demo``: see :mod:`evip.demo.pipeline`."""

import sys

from .pipeline import main

sys.exit(main())
