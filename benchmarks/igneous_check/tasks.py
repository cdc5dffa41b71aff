"""igneous's meshing, downsampling and skeletonizing tasks on a layer from ``emseg export --mesh``.

Run in a venv of its own (see README.md): ``python tasks.py LAYER`` on a copy of an exported
segmentation layer.  Meshes into another ``mesh_dir`` (legacy format),
adds downsampled mips, skeletonizes into another ``skel_dir``, and compares the bounds of
igneous's meshes with emseg's for the largest segments (nm, x y z).
"""

import json
import sys
from pathlib import Path

import igneous.task_creation as tc
import numpy as np
from cloudvolume import CloudVolume
from taskqueue import LocalTaskQueue

path = "file://" + sys.argv[1]
queue = LocalTaskQueue(parallel=1, progress=False)
before = json.load(open(sys.argv[1] + "/info"))

# legacy meshes into another mesh_dir (igneous's sharded merge ignores mesh_dir: it reads and rewrites
# the info of the layer's own mesh dir, whoever wrote the layer)
queue.insert_all(tc.create_meshing_tasks(path, mip=0, mesh_dir="mesh_igneous", shape=(256, 256, 64)))
queue.insert_all(tc.create_mesh_manifest_tasks(path, magnitude=1, mesh_dir="mesh_igneous"))
emseg_skeleton_ids = [p.name for p in Path(sys.argv[1], "skeletons").glob("*") if p.name.isdigit()]
# igneous skeletonizes into the layer's own skeleton dir (it has no other): emseg's are replaced
queue.insert_all(tc.create_skeletonizing_tasks(path, mip=0, shape=(256, 256, 64), dust_threshold=10,
                                               teasar_params={"scale": 1.5, "const": 300}))
queue.insert_all(tc.create_unsharded_skeleton_merge_tasks(path, magnitude=1, dust_threshold=0, tick_threshold=0))
queue.insert_all(tc.create_downsampling_tasks(path, mip=0, fill_missing=False))
after = json.load(open(sys.argv[1] + "/info"))
print("scales before", [s["key"] for s in before["scales"]], "after", [s["key"] for s in after["scales"]])
print("info mesh / skeletons keys unchanged:", after.get("mesh"), after.get("skeletons"))

ours = CloudVolume(path, mesh_dir="mesh", progress=False)
theirs = CloudVolume(path, mesh_dir="mesh_igneous", progress=False)
labels = np.asarray(ours[:, :, :])[..., 0]
ids, counts = np.unique(labels[labels > 0], return_counts=True)
diffs = []
for seg_id in ids[np.argsort(counts)[-20:]]:
    a, b = ours.mesh.get(int(seg_id), lod=0), theirs.mesh.get(int(seg_id))
    a, b = (m[int(seg_id)] if isinstance(m, dict) else m for m in (a, b))
    a, b = a.vertices, b.vertices
    diffs.append(np.concatenate([a.min(0) - b.min(0), a.max(0) - b.max(0)]))
diffs = np.array(diffs)
print("emseg - igneous mesh bounds (nm; min x y z, max x y z) over the 20 largest segments:")
print("  median", np.median(diffs, axis=0).round(2).tolist())
print("  max |d|", np.abs(diffs).max(axis=0).round(2).tolist())
largest = int(ids[np.argmax(counts)])
print("emseg skeletons before:", len(emseg_skeleton_ids), "segments; igneous's skeleton of the largest segment:",
      len(CloudVolume(path, progress=False).skeleton.get(largest).vertices), "vertices")
