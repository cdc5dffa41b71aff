"""The model zoo: U-Net, FusionNet, UNet++ and FCN-8s in 2D and 3D, a registry and safe checkpoints.

>>> from emseg.models import build
>>> model = build("unet", ndim=2, base_channels=8, depth=3, padding="valid")
>>> model.output_shape((124, 124))
(36, 36)

Every model is a :class:`SegmentationModel` that declares its geometry (``input_multiple``,
``context``, ``receptive_field``, ``output_shape()``) so callers never hard-code halos.
Checkpoints are a directory of safetensors weights plus a JSON config; pickles are refused.
"""

from emseg.models.base import ModelSpec, SegmentationModel
from emseg.models.checkpoint import (
    Checkpoint,
    CheckpointConfig,
    Normalization,
    load_checkpoint,
    load_checkpoint_config,
    save_checkpoint,
)
from emseg.models.fcn import FCN
from emseg.models.fusionnet import FusionNet
from emseg.models.registry import MODELS, build
from emseg.models.unet import UNet
from emseg.models.unetpp import UNetPlusPlus

__all__ = [
    "FCN",
    "MODELS",
    "Checkpoint",
    "CheckpointConfig",
    "FusionNet",
    "ModelSpec",
    "Normalization",
    "SegmentationModel",
    "UNet",
    "UNetPlusPlus",
    "build",
    "load_checkpoint",
    "load_checkpoint_config",
    "save_checkpoint",
]
