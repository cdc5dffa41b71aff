"""The block engine: runs a stage's blocks on a cluster and keeps the state that makes a run resumable.

* :mod:`emseg.engine.runner`: :func:`~emseg.engine.runner.run_blockwise`, the tasks, retries and reports.
* :mod:`emseg.engine.ledger`: the per-block completion records inside an output.
* :mod:`emseg.engine.runstate`: create / resume / refuse / replace an output (fingerprints, claims).
* :mod:`emseg.engine.scratch`, :mod:`emseg.engine.pairs`: a run's scratch arrays, tables and face pairs.
* :mod:`emseg.engine.lock`: one run at a time per output.
* :mod:`emseg.engine.resources`: memory checks against the workers.
"""
