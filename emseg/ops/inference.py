"""Blockwise model inference: arrays in, arrays out (no zarr, no dask).

A block is computed tile by tile on the run's global tile grid (:mod:`emseg.ops.tiling`): every output
voxel comes from the same tile with the same input whatever the block size or the number of workers,
so blockwise output is bit-identical by construction.  With Gaussian blending
(:attr:`emseg.ops.tiling.Tiling.blend`) tiles are accumulated in global C order, so the floating-point
sums are the same in every block.

A 2D model runs per z-slice: its tiles are one voxel thick along z and carry no z halo.
Axis order: arrays ``(c, z, y, x)``, tensors ``(b, c, [z,] y, x)``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch.nn.utils.fusion import fuse_conv_bn_weights

from emseg.errors import ConfigError, GeometryError, InvalidDataError, UnsupportedDtypeError
from emseg.geometry import Roi
from emseg.ops.tiling import Tiling

__all__ = [
    "Precision",
    "apply_activation",
    "FusedConv",
    "cpu_has_native_bf16",
    "default_precision",
    "downsample_sections",
    "fuse_conv_blocks",
    "gaussian_window",
    "normalize",
    "predict_array",
    "predict_block",
    "prepare_model",
    "repeat_sections",
    "to_output_dtype",
]

Precision = Literal["fp32", "bf16", "fp16"]
PrecisionChoice = Literal["auto", "fp32", "bf16", "fp16"]
Activation = Literal["sigmoid", "softmax", "none"]
OutputDtype = Literal["uint8", "float16", "float32"]

log = logging.getLogger(__name__)

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}

def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 AVX512-BF16 or AMX; ARM BF16), for oneDNN's kernels.

    Read from oneDNN itself where torch exposes it, else from the ``/proc/cpuinfo`` flags.
    """
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    if check is not None:
        try:
            return bool(check())
        except RuntimeError:  # pragma: no cover - op not built
            pass
    try:  # pragma: no cover - fallback for builds without the op
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "").split()
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))  # pragma: no cover


def default_precision(device: str) -> Precision:
    """``"bf16"`` on CUDA and on CPUs with native bf16 (:func:`cpu_has_native_bf16`), ``"fp32"`` elsewhere.

    bf16 autocast keeps the uint8 output within one step of fp32 on real EM (``tests/ops/test_inference.py``);
    without native bf16 it is emulated and slower than fp32.
    """
    if device.startswith("cuda"):
        return "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def resolve_precision(precision: str, device: str) -> Precision:
    """``"auto"`` -> :func:`default_precision`; a named precision as it is (checked)."""
    if precision == "auto":
        return default_precision(device)
    if precision not in _PRECISIONS:
        raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return precision  # type: ignore[return-value]


_PRECISIONS = ("fp32", "bf16", "fp16")


def prepare_model(model: Any, device: str | torch.device = "cpu", precision: Precision | None = None) -> Any:
    """The model in eval mode on ``device``, weights in channels-last layout (NHWC / NDHWC).

    oneDNN (CPU) and cuDNN (tensor cores) run convolutions fastest channels-last, in fp32 as in bf16
    (1.4x fp32, 2.5x bf16 on an AVX512-BF16 CPU; ``benchmarks/README.md``).  :func:`predict_block` feeds batches in
    the model's layout.  Values are those of the same model in NCHW up to float rounding.

    With ``precision="bf16"`` on a CPU, every :class:`~emseg.models.blocks.ConvBlock` also becomes one
    oneDNN primitive (:func:`fuse_conv_blocks`), checked against the unfused model once; the model
    is modified in place either way.
    """
    model = model.eval().to(device)
    ndim = int(getattr(model, "ndim", 2))
    model = model.to(memory_format=torch.channels_last if ndim == 2 else torch.channels_last_3d)
    if precision == "bf16" and torch.device(device).type == "cpu" and _can_fuse():
        fuse_conv_blocks(model)
    return model


def _can_fuse() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class FusedConv(torch.nn.Module):
    """A :class:`~emseg.models.blocks.ConvBlock` (convolution, batch norm, ReLU) as one oneDNN convolution.

    The batch norm (eval statistics) is folded into the weights and the ReLU runs as the
    convolution's post-op, so the block's output is written once instead of two or three times:
    the op torch's own compiler emits for such a block (``torch.ops.mkldnn._convolution_pointwise``),
    without its compile step.  Weights in ``dtype``; input is cast to it.
    """

    def __init__(self, block: torch.nn.Sequential, dtype: torch.dtype) -> None:
        super().__init__()
        conv: Any = block[0]
        bn: Any = next((m for m in block if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)), None)
        weight = conv.weight.detach().float()
        bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels)
        if bn is not None:  # running statistics: checked by _fusable
            weight, bias = fuse_conv_bn_weights(
                weight, bias, bn.running_mean.float(), bn.running_var.float(), bn.eps,
                bn.weight.detach().float() if bn.affine else None, bn.bias.detach().float() if bn.affine else None)
        fmt = torch.channels_last if weight.dim() == 4 else torch.channels_last_3d
        self.weight = torch.nn.Parameter(weight.to(dtype).contiguous(memory_format=fmt), requires_grad=False)
        self.bias = torch.nn.Parameter(bias.to(dtype), requires_grad=False)
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), int(conv.groups)
        self.post = "relu" if any(isinstance(m, torch.nn.ReLU) for m in block) else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(x.to(self.weight.dtype), self.weight, self.bias, self.padding,
                                                       self.stride, self.dilation, self.groups, self.post, [], "")


def _fusable(block: torch.nn.Module) -> bool:
    from emseg.models.blocks import ConvBlock

    if not isinstance(block, ConvBlock) or not block or any(isinstance(m, FusedConv) for m in block):
        return False
    conv, rest = block[0], list(block)[1:]
    if not isinstance(conv, (torch.nn.Conv2d, torch.nn.Conv3d)) or isinstance(conv.padding, str) \
            or conv.padding_mode != "zeros":
        return False
    bns = [m for m in rest if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if any(m.running_mean is None or m.running_var is None for m in bns):
        return False  # batch statistics even in eval mode: nothing to fold
    return all(isinstance(m, (torch.nn.ReLU, torch.nn.modules.batchnorm._BatchNorm, torch.nn.Identity)) for m in rest) \
        and len(bns) <= 1 and (bool(bns) or any(isinstance(m, torch.nn.ReLU) for m in rest))


def _set_layers(block: torch.nn.Sequential, layers: list[torch.nn.Module]) -> None:
    for name in list(block._modules):
        del block._modules[name]
    for layer in layers:
        block.append(layer)


def fuse_conv_blocks(model: Any, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace, in place, each fusable ``ConvBlock`` of ``model`` (eval mode, on the CPU) by a :class:`FusedConv`.

    Blocks with nothing to fuse (a lone convolution) stay as they are.  The fused model is checked
    once on a small random input: under bf16 autocast (the way :func:`predict_block` runs it) it must
    be as close to the fp32 model as the unfused model is (1.5x its largest error + 0.01).  If a fused
    op is missing or the outputs disagree, the original blocks are put back and a warning is logged.
    Returns the number of fused blocks.
    """
    blocks = [m for m in model.modules() if _fusable(m)]
    if not blocks:
        return 0
    ndim = int(getattr(model, "ndim", len(blocks[0][0].kernel_size)))
    at_least = getattr(model, "valid_input_shape", lambda s: tuple(s))((32,) * ndim)
    fmt = torch.channels_last if ndim == 2 else torch.channels_last_3d
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((1, int(getattr(model, "in_channels", 1)), *at_least), generator=generator)
    x = x.contiguous(memory_format=fmt)
    saved = [list(b) for b in blocks]
    try:
        with torch.inference_mode():
            exact = model(x).float()
            with torch.autocast("cpu", dtype=dtype):
                unfused = model(x).float()
                for block in blocks:
                    _set_layers(block, [FusedConv(block, dtype)])
                got = model(x).float()
        # folding batch norm rounds the weights differently: as close to fp32 as the unfused bf16 model, not equal
        error, allowed = float((got - exact).abs().max()), 1.5 * float((unfused - exact).abs().max()) + 0.01
        ok = got.shape == exact.shape and error <= allowed
        why = "" if ok else f"max difference to fp32 {error:.3g}, unfused {allowed:.3g} allowed"
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        ok, why = False, f"{type(e).__name__}: {e}"
    if not ok:
        for block, layers in zip(blocks, saved):
            _set_layers(block, layers)
        log.warning("fused oneDNN convolutions do not reproduce the model (%s); running it unfused", why)
        return 0
    return len(blocks)


def _memory_format(model: Any, dims: int) -> torch.memory_format:
    """channels-last when the model's convolution weights are stored so (:func:`prepare_model`), else contiguous."""
    fmt = torch.channels_last if dims == 4 else torch.channels_last_3d
    for p in model.parameters():  # a weight with one input channel is both: look for a telling one
        if p.dim() == dims and p.is_contiguous(memory_format=fmt) != p.is_contiguous():
            return fmt if p.is_contiguous(memory_format=fmt) else torch.contiguous_format
    return torch.contiguous_format


def downsample_sections(raw: npt.NDArray[Any], factor: int) -> npt.NDArray[Any]:
    """``raw`` (``(..., y, x)``, y and x multiples of ``factor``) averaged over ``factor`` x ``factor`` squares of
    each section: a model that runs at a coarser in-plane voxel size than the volume's sees what it was trained
    on.  Integer input is rounded back to its dtype (as the coarse training sections were made), floats stay float."""
    from skimage.transform import downscale_local_mean

    if factor == 1:
        return raw
    if raw.shape[-1] % factor or raw.shape[-2] % factor:
        raise GeometryError(f"sections of {raw.shape[-2:]} voxels are not a multiple of the downsampling {factor}")
    coarse = downscale_local_mean(raw, (1,) * (raw.ndim - 2) + (factor, factor))
    if np.issubdtype(raw.dtype, np.integer):
        return np.rint(coarse).astype(raw.dtype)
    return coarse.astype(raw.dtype, copy=False)


def repeat_sections(values: npt.NDArray[Any], factor: int, shape: Sequence[int]) -> npt.NDArray[Any]:
    """``values`` (``(..., y, x)``) repeated ``factor`` times along y and x and cut to ``shape`` (y, x): a
    coarse prediction on the volume's voxels, each voxel taking the value of the coarse voxel it lies in,
    so that a block's values depend on its own coarse voxels only."""
    if factor == 1:
        return values
    fine = np.repeat(np.repeat(values, factor, axis=-2), factor, axis=-1)
    return fine[..., : shape[-2], : shape[-1]]


def normalize(raw: npt.NDArray[Any], mean: float, std: float) -> npt.NDArray[np.float32]:
    """Scale raw voxels to float32: uint8 / 255, uint16 / 65535, floats (0-1) as they are; then ``(x - mean) / std``.

    Raises
    ------
    UnsupportedDtypeError
        Any other dtype.
    InvalidDataError
        Float input holding NaN or infinity, or not scaled to 0-1 (e.g. 0-255 as float).
    """
    if raw.dtype == np.uint8:
        x = raw.astype(np.float32) * np.float32(1 / 255)
    elif raw.dtype == np.uint16:
        x = raw.astype(np.float32) * np.float32(1 / 65535)
    elif np.issubdtype(raw.dtype, np.floating):
        x = raw.astype(np.float32)
        if not np.isfinite(x).all():
            bad = int(np.count_nonzero(~np.isfinite(x)))
            raise InvalidDataError(f"float input holds {bad} NaN/inf voxel(s); fill or mask them before predicting")
        low, high = float(x.min(initial=0.0)), float(x.max(initial=0.0))
        if high > 1.5 or low < -0.5:  # e.g. 0-255 stored as float: every voxel would read as saturated
            raise InvalidDataError(f"float input ranges {low:g} to {high:g}, but float EM must be scaled to 0-1 "
                                   "(uint8 and uint16 are scaled by emseg); divide it by its maximum, or store it as "
                                   "uint8/uint16")
    else:
        raise UnsupportedDtypeError(f"cannot normalise {raw.dtype} input; expected uint8, uint16 or float")
    x -= np.float32(mean)
    x *= np.float32(1 / std)
    return x


def gaussian_window(shape: Sequence[int], sigma_scale: float = 0.125) -> npt.NDArray[np.float32]:
    """Separable Gaussian weight over a tile output, peak 1, sigma ``sigma_scale * size`` per axis."""
    weight = np.ones((), dtype=np.float64)
    for n in shape:
        if n == 1:
            axis = np.ones(1)
        else:
            c = (n - 1) / 2
            axis = np.exp(-0.5 * ((np.arange(n) - c) / (sigma_scale * n)) ** 2)
        weight = np.multiply.outer(weight, axis)
    window: npt.NDArray[np.float32] = np.maximum(weight / weight.max(), 1e-3).astype(np.float32)
    return window


def apply_activation(logits: torch.Tensor, activation: Activation) -> torch.Tensor:
    """Logits ``(b, c, ...)`` to float32 outputs: per-channel sigmoid, softmax over c, or as is."""
    logits = logits.float()
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    if activation == "softmax":
        return torch.softmax(logits, dim=1)
    return logits


def to_output_dtype(values: npt.NDArray[np.float32], dtype: OutputDtype) -> npt.NDArray[Any]:
    """Cast outputs for storage: ``uint8`` is ``round(clip(p, 0, 1) * 255)``, floats are cast."""
    if dtype == "uint8":
        quantised: npt.NDArray[Any] = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
        return quantised
    if dtype in ("float16", "float32"):
        cast: npt.NDArray[Any] = values.astype(dtype)
        return cast
    raise ConfigError(f"unknown output dtype {dtype!r}; expected uint8, float16 or float32")


def _flips(ndim: int) -> Iterator[tuple[int, ...]]:
    """Every subset of spatial tensor dims (2.. of a (b, c, ...) tensor), the identity first."""
    dims = range(2, 2 + ndim)
    for r in range(ndim + 1):
        yield from itertools.combinations(dims, r)


def _forward(
    model: Any,
    batch: torch.Tensor,
    *,
    activation: Activation,
    tta: bool,
    precision: Precision,
) -> torch.Tensor:
    device_type = batch.device.type
    autocast = (
        torch.autocast(device_type=device_type, dtype=_AUTOCAST[precision])
        if precision in _AUTOCAST
        else torch.autocast(device_type=device_type, enabled=False)
    )
    with torch.inference_mode(), autocast:
        if not tta:
            return apply_activation(model(batch), activation)
        total: torch.Tensor | None = None
        flips = list(_flips(batch.dim() - 2))
        for dims in flips:
            x = torch.flip(batch, dims) if dims else batch
            y = apply_activation(model(x), activation)
            y = torch.flip(y, dims) if dims else y
            total = y if total is None else total + y
        assert total is not None
        return total / len(flips)


def predict_block(
    model: Any,
    raw: npt.NDArray[Any],
    *,
    raw_roi: Roi,
    write_roi: Roi,
    tiling: Tiling,
    mean: float = 0.5,
    std: float = 0.5,
    activation: Activation = "sigmoid",
    batch_size: int = 4,
    tta: bool = False,
    precision: Precision = "fp32",
) -> npt.NDArray[np.float32]:
    """Run ``model`` over one block's tiles and return its core.

    Parameters
    ----------
    model : SegmentationModel
        In eval mode, on the device the batches should run on.
    raw : ndarray
        The raw voxels of ``raw_roi``, ``(z, y, x)`` or ``(c, z, y, x)``; uint8, uint16 or float.
        ``raw_roi`` must contain ``tiling.read_roi(write_roi)`` (mirrored beyond the volume).
    write_roi : Roi
        The block's core, volume voxels.
    tiling : Tiling
        From :func:`make_tiling`; the same for every block of a run.
    mean, std : float
        Input normalisation after scaling to [0, 1] (see :func:`normalize`).
    activation : {"sigmoid", "softmax", "none"}
        Applied to the logits in float32.
    batch_size : int
        Tiles per forward pass; the last batch is padded with zero tiles so that every pass has
        the same shape.
    tta : bool
        Average over all flips of the spatial axes (4 in 2D, 8 in 3D).
    precision : {"fp32", "bf16", "fp16"}
        Autocast dtype of the forward pass; outputs are float32.

    Returns
    -------
    ndarray of float32, shape ``(out_channels, *write_roi.shape)``

    Raises
    ------
    InvalidDataError
        NaN/inf in float input.
    GeometryError
        ``raw`` does not cover the tiles' inputs or does not match ``raw_roi``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if raw.ndim == 3:
        raw = raw[np.newaxis]
    if tuple(raw.shape[1:]) != raw_roi.shape:
        raise GeometryError(f"raw data of shape {raw.shape} does not match {raw_roi}")
    needed = tiling.read_roi(write_roi)
    if not raw_roi.contains(needed):
        raise GeometryError(f"raw data {raw_roi} does not cover the tiles' inputs {needed}")
    x = normalize(raw, mean, std)
    tiles = tiling.tiles(write_roi)
    device = next(model.parameters()).device
    lead = 3 - tiling.model_ndim
    channels = int(model.out_channels)
    core = np.empty((channels, *write_roi.shape), dtype=np.float32)
    if tiling.blend == "gaussian":
        window = gaussian_window(tiling.output_shape)
        core[:] = 0
        weight = np.zeros(write_roi.shape, dtype=np.float32)
    shape_in = (x.shape[0],) + tiling.input_shape[lead:]
    memory_format = _memory_format(model, 2 + len(shape_in))
    for start in range(0, len(tiles), batch_size):
        group = tiles[start : start + batch_size]
        batch = np.zeros((batch_size, *shape_in), dtype=np.float32)
        for i, origin in enumerate(group):
            roi = Roi(tuple(o - h for o, h in zip(origin, tiling.input_offset)), tiling.input_shape)
            tile = x[(slice(None),) + roi.relative_to(raw_roi).to_slices()]
            batch[i] = tile.reshape(shape_in)
        tensor = torch.from_numpy(batch).to(device).contiguous(memory_format=memory_format)
        out = _forward(model, tensor, activation=activation, tta=tta, precision=precision)
        result = out[: len(group)].cpu().numpy().reshape((len(group), channels) + tiling.output_shape)
        for i, origin in enumerate(group):
            out_roi = Roi(tuple(o - h for o, h in zip(origin, tiling.output_offset)), tiling.output_shape)
            if tiling.blend == "crop":
                part = Roi(origin, tiling.tile_shape).intersect(write_roi)
            else:
                part = out_roi.intersect(write_roi)
            if part.empty:
                continue
            src = (slice(None),) + part.relative_to(out_roi).to_slices()
            dst = (slice(None),) + part.relative_to(write_roi).to_slices()
            if tiling.blend == "crop":
                core[dst] = result[i][src]
            else:
                w = window[src[1:]]
                core[dst] += result[i][src] * w
                weight[dst[1:]] += w
    if tiling.blend == "gaussian":
        core /= weight
    return core


def predict_array(
    model: Any,
    raw: npt.NDArray[Any],
    *,
    tiling: Tiling,
    mean: float = 0.5,
    std: float = 0.5,
    activation: Activation = "sigmoid",
    batch_size: int = 4,
    tta: bool = False,
    precision: Precision = "fp32",
) -> npt.NDArray[np.float32]:
    """Run ``model`` over a whole in-memory volume as one block: :func:`predict_block` on its mirrored tiles.

    ``raw`` is ``(z, y, x)`` or ``(c, z, y, x)``; beyond the volume's borders it is mirrored without
    repeating the edge voxel, as ``Volume.read(roi, pad="reflect")`` mirrors for ``emseg predict``.
    ``tiling`` comes from :func:`make_tiling` for ``raw``'s spatial shape.  For validation inside
    training and small arrays in tests; large volumes go through :mod:`emseg.workflows.predict`.

    Returns
    -------
    ndarray of float32, shape ``(out_channels, z, y, x)``
    """
    if raw.ndim == 3:
        raw = raw[np.newaxis]
    shape = tuple(int(s) for s in raw.shape[1:])
    if shape != tuple(tiling.volume_shape):
        raise GeometryError(f"raw data of shape {shape} does not match the tiling's volume {tiling.volume_shape}")
    write_roi = Roi((0, 0, 0), shape)
    read_roi = tiling.read_roi(write_roi)
    pad = [(0, 0)] + [(max(0, -b), max(0, e - n)) for b, e, n in zip(read_roi.begin, read_roi.end, shape)]
    padded = np.pad(raw, pad, mode="reflect") if any(lo or hi for lo, hi in pad) else raw
    # np.pad reflects as often as needed; crop to the read region when it lies inside on some side
    crop = (slice(None),) + tuple(slice(b + lo, e + lo) for b, e, (lo, _) in zip(read_roi.begin, read_roi.end, pad[1:]))
    return predict_block(model, padded[crop], raw_roi=read_roi, write_roi=write_roi, tiling=tiling, mean=mean, std=std,
                         activation=activation, batch_size=batch_size, tta=tta, precision=precision)
