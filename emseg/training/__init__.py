"""Training: data sampling, augmentation, losses, metrics, DDP and the loop behind ``emseg train``.

>>> from emseg.training import TrainConfig, DataSource, train
>>> report = train(TrainConfig(train=[DataSource(raw="raw.tif", labels="labels.tif")], output="ckpt"))

``train(cfg)`` is the single entry point; the other names are the building blocks it uses, public
so they can be tested and reused (e.g. :func:`weight_map`, :func:`elastic_field`).
"""

from emseg.training.augment import deform, elastic_field, flip_rotate, intensity, section_defects
from emseg.training.config import DataSource, TrainConfig, load_train_config
from emseg.training.distributed import DistInfo, launcher_env
from emseg.training.loop import TrainReport, train
from emseg.training.losses import bce_dice_loss, soft_dice_loss, total_loss, weight_map, weighted_cross_entropy
from emseg.training.validation import (
    SegmentationScores,
    membrane_scores,
    predict_volume,
    segments_from_membrane,
    validate,
)

__all__ = [
    "DataSource",
    "DistInfo",
    "SegmentationScores",
    "TrainConfig",
    "TrainReport",
    "bce_dice_loss",
    "deform",
    "elastic_field",
    "flip_rotate",
    "intensity",
    "launcher_env",
    "load_train_config",
    "membrane_scores",
    "predict_volume",
    "section_defects",
    "segments_from_membrane",
    "soft_dice_loss",
    "total_loss",
    "train",
    "validate",
    "weight_map",
    "weighted_cross_entropy",
]
