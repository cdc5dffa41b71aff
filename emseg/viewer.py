"""Moved to :mod:`emseg.export.view` (issue 12).  ``emseg.viewer`` stays importable: it is the same module
object, so attribute reads and writes (and monkeypatching) reach the real one."""

import sys

from emseg.export import view as _module
from emseg.export.view import *  # noqa: F403  (the public names, for type checkers)

sys.modules[__name__] = _module
