"""Moved to :mod:`emseg.workflows.label` (issue 12: orchestration lives in
``emseg/workflows/``).  ``emseg.label`` stays importable: it is the same module object."""

import sys

from emseg.workflows import label as _module
from emseg.workflows.label import *  # noqa: F403  (the public names, for type checkers)

sys.modules[__name__] = _module
