"""Moved to :mod:`emseg.workflows.evaluate` (issue 12: orchestration lives in
``emseg/workflows/``).  ``emseg.evaluate`` stays importable: it is the same module object."""

import sys

from emseg.workflows import evaluate as _module
from emseg.workflows.evaluate import *  # noqa: F403  (the public names, for type checkers)

sys.modules[__name__] = _module
