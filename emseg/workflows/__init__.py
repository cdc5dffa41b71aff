"""Orchestration: one module per pipeline step, each wiring I/O, compute and the block runner
(:func:`emseg.runner.run_blockwise`) into a run of one command.

::

    predict.py       emseg predict      raw -> boundary probabilities / affinities (OME-Zarr image)
    label.py         emseg label        prediction -> segment IDs (cc or watershed, stitched)
    agglomerate.py   emseg agglomerate  prediction -> fragments, region graph, merged segments
    segment.py       emseg segment      predict + label/agglomerate + pyramids on one cluster
    evaluate.py      emseg evaluate     segmentations vs ground truth (Rand, VI), threshold sweeps

The compute they call lives in :mod:`emseg.inference` and :mod:`emseg.segment`, the storage in
:mod:`emseg.io`, the cluster in :mod:`emseg.cluster`, exports and pyramids in :mod:`emseg.export`.
The old module paths (``emseg.predict``, ``emseg.label``, ``emseg.agglomerate``, ``emseg.pipeline``,
``emseg.evaluate``) are aliases of these same module objects.
"""
