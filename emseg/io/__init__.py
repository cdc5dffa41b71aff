"""Volume I/O: zarr v2/v3 and OME-Zarr (NGFF 0.4/0.5) images, TIFF/PNG/HDF5 sources.

The only package that imports zarr, tifffile or h5py.
"""

from emseg.io.sources import Source, load_array, open_source
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
    "Source",
    "load_array",
    "open_source",
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
