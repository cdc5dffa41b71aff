import shutil
import sys
from pathlib import Path

import numpy as np

from emseg.export.precomputed import export_precomputed
from emseg.io import create_labels, create_volume, mark_complete

if __name__ == "__main__":
    f = Path(sys.argv[1])
    shutil.rmtree(f, ignore_errors=True)
    f.mkdir()
    shape = (30, 512, 512)
    vol = create_volume(f/"v.zarr", shape=shape, dtype=np.uint8, chunks=(30, 256, 256), voxel_size=(50., 8., 8.))
    vol.write(vol.roi, np.zeros(shape, np.uint8))
    rng = np.random.default_rng(0)
    lab = (np.arange(512)[None, :, None] // 37 * 100 + np.arange(512)[None, None, :] // 41 + np.arange(30)[:, None, None] // 7 * 10000).astype(np.uint64) + 1
    seg = create_labels(f/"v.zarr", "segments")
    seg.write(seg.roi, lab)
    mark_complete(f/"v.zarr")
    mark_complete(f/"v.zarr"/"labels"/"segments")
    print(export_precomputed(f/"v.zarr"/"labels"/"segments", f/"pc", overwrite=False, progress=False).summary())
