"""Moved to :mod:`emseg.export.precomputed` (issue 12).  ``emseg.io.precomputed`` stays importable: it is the same module
object, so attribute reads and writes (and monkeypatching) reach the real one."""

import sys

from emseg.export import precomputed as _module
from emseg.export.precomputed import *  # noqa: F403  (the public names, for type checkers)

sys.modules[__name__] = _module
