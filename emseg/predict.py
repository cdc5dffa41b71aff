"""Moved to :mod:`emseg.workflows.predict` (issue 12: orchestration lives in
``emseg/workflows/``).  ``emseg.predict`` stays importable: it is the same module object."""

import sys

from emseg.workflows import predict as _module
from emseg.workflows.predict import *  # noqa: F403  (the public names, for type checkers)

sys.modules[__name__] = _module
