"""Volume I/O: zarr v2/v3 and OME-Zarr (NGFF 0.4/0.5) images, TIFF/PNG/HDF5 sources.

With :mod:`emseg.export` (pyramid levels, precomputed layers), the only code that imports zarr,
tifffile or h5py.
"""

from emseg.io.safety import check_distinct
from emseg.io.sources import Source, load_array, open_source
from emseg.io.volume import (
    Volume,
    create_labels,
    create_volume,
    is_label_image,
    label_image_paths,
    mark_complete,
    open_volume,
    prepare_output,
    read_status,
    update_status,
)

__all__ = [
    "Source",
    "load_array",
    "open_source",
    "Volume",
    "check_distinct",
    "create_labels",
    "create_volume",
    "is_label_image",
    "label_image_paths",
    "mark_complete",
    "open_volume",
    "prepare_output",
    "read_status",
    "update_status",
]
