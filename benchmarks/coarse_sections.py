"""Sections at a coarser in-plane voxel size, for training a model that runs there (``run_voxel_size_nm``).

The raw is mean-downsampled by ``--factor`` in y and x and rounded back to uint8, as ``emseg predict``
downsamples a volume for such a model; binary membrane labels (0 = membrane, 255 = cell interior, the
ISBI convention; ``--kind membrane-mask`` for masks of the membrane) follow the majority of each square,
instance ids (``--kind instances``) the square's first voxel.  The
bundled ``sstem2d`` model was fine-tuned on ISBI 2012 train sections at 4 nm and at the 8 nm these
write (``emseg/models/bundled/MODEL_CARD.md``):

    python benchmarks/coarse_sections.py ../shared/data/isbi2012/train-volume.tif \\
        ../shared/data/isbi2012/train-labels.tif --out /tmp/isbi8 --factor 2

writes ``/tmp/isbi8_raw.tif`` and ``/tmp/isbi8_labels.tif`` (outside the repository: data stays out of it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile
from skimage.transform import downscale_local_mean


def coarse_raw(raw: np.ndarray, factor: int) -> np.ndarray:
    mean = downscale_local_mean(raw, (1, factor, factor))
    return np.rint(mean).astype(raw.dtype)


def coarse_labels(labels: np.ndarray, factor: int, kind: str = "interior-mask") -> np.ndarray:
    """Labels of the coarse sections: a mask by the majority of each square, instance ids by its first voxel."""
    if kind == "instances":
        return np.ascontiguousarray(labels[:, ::factor, ::factor])
    majority = downscale_local_mean((labels > 0).astype(np.float64) * 255, (1, factor, factor)) > 127.5
    if kind == "membrane-mask":  # non-zero = membrane
        return majority.astype(np.uint8)
    return np.where(majority, 255, 0).astype(np.uint8)  # non-zero = interior


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="Prefix of the two TIFFs written.")
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--kind", choices=("interior-mask", "membrane-mask", "instances"), default="interior-mask",
                        help="The labels: 0 = membrane (ISBI), non-zero = membrane (vnc_sstem), or instance ids (CREMI).")
    args = parser.parse_args()
    raw, labels = tifffile.imread(args.raw), tifffile.imread(args.labels)
    if raw.shape[-2] % args.factor or raw.shape[-1] % args.factor:
        raise SystemExit(f"{args.raw}: sections of {raw.shape[-2:]} are not a multiple of {args.factor}")
    tifffile.imwrite(f"{args.out}_raw.tif", coarse_raw(raw, args.factor), compression="zlib")
    tifffile.imwrite(f"{args.out}_labels.tif", coarse_labels(labels, args.factor, args.kind), compression="zlib")
    print(f"wrote {args.out}_raw.tif and {args.out}_labels.tif: {raw.shape[0]} sections of "
          f"{raw.shape[1] // args.factor} x {raw.shape[2] // args.factor}")


if __name__ == "__main__":
    main()
