"""Volume I/O: zarr v2/v3 and OME-Zarr (NGFF 0.4/0.5) images, TIFF/PNG/HDF5 sources.

The only package that imports zarr, tifffile or h5py.
"""

from emseg.io.volume import (
    Volume,
    check_distinct,
    create_labels,
    create_volume,
    mark_complete,
    open_volume,
    prepare_output,
    read_status,
    update_status,
)

__all__ = [
    "Volume",
    "check_distinct",
    "create_labels",
    "create_volume",
    "mark_complete",
    "open_volume",
    "prepare_output",
    "read_status",
    "update_status",
]
