"""Orchestration: one module per pipeline step, each wiring I/O, compute and the block runner
(:func:`emseg.engine.runner.run_blockwise`) into a run of one command.

::

    predict.py       emseg predict      raw -> boundary probabilities / affinities (OME-Zarr image)
    label.py         emseg label        prediction -> segment IDs (cc or watershed, stitched)
    agglomerate.py   emseg agglomerate  prediction -> fragments, region graph, merged segments
    segment.py       emseg segment      predict + label/agglomerate + pyramids on one cluster
    evaluate.py      emseg evaluate     segmentations vs ground truth (Rand, VI), threshold sweeps

The compute they call lives in :mod:`emseg.ops` (numpy in, numpy out), the storage in
:mod:`emseg.io`, the block engine in :mod:`emseg.engine`, the cluster in :mod:`emseg.cluster`, exports
and pyramids in :mod:`emseg.export`.
"""
