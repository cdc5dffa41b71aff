"""Moved to :mod:`emseg.workflows.agglomerate` (issue 12: orchestration lives in
``emseg/workflows/``).  ``emseg.agglomerate`` stays importable: it is the same module object."""

import sys

from emseg.workflows import agglomerate as _module
from emseg.workflows.agglomerate import *  # noqa: F403  (the public names, for type checkers)

sys.modules[__name__] = _module
