"""Moved to :mod:`emseg.export.pyramid` (issue 12).  ``emseg.io.pyramid`` stays importable: it is the same module
object, so attribute reads and writes (and monkeypatching) reach the real one."""

import sys

from emseg.export import pyramid as _module
from emseg.export.pyramid import *  # noqa: F403  (the public names, for type checkers)

sys.modules[__name__] = _module
