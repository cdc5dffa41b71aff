"""``emseg segment``'s orchestration moved to :mod:`emseg.workflows.segment` (issue 12: orchestration lives in
``emseg/workflows/``).  ``emseg.pipeline`` stays importable: it is the same module object."""

import sys

from emseg.workflows import segment as _module
from emseg.workflows.segment import *  # noqa: F403  (the public names, for type checkers)

sys.modules[__name__] = _module
