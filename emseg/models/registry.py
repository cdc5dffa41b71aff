"""The explicit model registry: ``MODELS`` and ``build(name, **config)``."""

from __future__ import annotations

import inspect
from typing import Any

from emseg.errors import ConfigError
from emseg.models.base import SegmentationModel
from emseg.models.fcn import FCN
from emseg.models.fusionnet import FusionNet
from emseg.models.unet import UNet
from emseg.models.unetpp import UNetPlusPlus

__all__ = ["MODELS", "build"]

#: Every architecture by its registry name.  Explicit: no discovery, no dotted import paths.
MODELS: dict[str, type[SegmentationModel]] = {
    "unet": UNet,
    "fusionnet": FusionNet,
    "unetpp": UNetPlusPlus,
    "fcn": FCN,
}


def build(name: str | None = None, /, **config: Any) -> SegmentationModel:
    """Build a model by registry name.

    Parameters
    ----------
    name : str, optional
        A key of :data:`MODELS`.  May instead be given as ``config["name"]``, so both
        ``build("unet", **kwargs)`` and ``build(**model.config)`` work.
    **config
        The architecture's keyword arguments (see each class); missing ones take their defaults.

    Returns
    -------
    SegmentationModel
        A freshly initialised model in training mode, on the CPU (or the current default device).

    Raises
    ------
    ConfigError
        Unknown name, unknown keyword argument, or an invalid value.
    """
    given = config.pop("name", None)
    if name is None:
        name = given
    elif given is not None and given != name:
        raise ConfigError(f"build() got two model names: {name!r} and config name {given!r}")
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    cls = MODELS[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {', '.join(unknown)}; valid options are {', '.join(allowed)}")
    return cls(**config)
