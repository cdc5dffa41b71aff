"""Moved to :mod:`emseg.export.meshes` (issue 12).  ``emseg.io.meshes`` stays importable: it is the same module
object, so attribute reads and writes (and monkeypatching) reach the real one."""

import sys

from emseg.export import meshes as _module
from emseg.export.meshes import *  # noqa: F403  (the public names, for type checkers)

sys.modules[__name__] = _module
