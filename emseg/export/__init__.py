"""Everything made from a finished output for people and viewers, each a blockwise stage or a reader.

* :mod:`emseg.export.pyramid`: downsampled OME-Zarr levels (mean for images, mode for labels).
* :mod:`emseg.export.precomputed`: neuroglancer precomputed layers; :mod:`emseg.export.meshes`
  their meshes and skeletons.
* :mod:`emseg.export.preview`: a PNG montage of raw, prediction and labels.
* :mod:`emseg.export.view`: neuroglancer on a local, read-only store server (``emseg view``).

Imports point one way: export -> io, engine, ops.
"""
