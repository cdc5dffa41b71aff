"""Moved to :mod:`emseg.segment.stitch` (issue 12: all label compute lives in ``emseg/segment/``).
``emseg.stitch`` stays importable: it is the same module object."""

import sys

from emseg.segment import stitch as _module
from emseg.segment.stitch import *  # noqa: F403  (the public names, for type checkers)

sys.modules[__name__] = _module
