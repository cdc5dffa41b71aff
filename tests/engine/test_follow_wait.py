"""A follower waiting on a stage that has ended sleeps its poll interval instead of spinning."""

from __future__ import annotations

import threading
import time

from emseg.engine.follow import Progress
from emseg.geometry import Roi, plan_blocks


def test_wait_after_the_producer_ended_takes_the_whole_timeout() -> None:
    progress = Progress("predict")
    progress.start(plan_blocks(Roi((0, 0, 0), (4, 8, 8)), (2, 8, 8)))
    progress.end()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3:
        progress.wait(0.05)
        calls += 1
    assert calls <= 7, f"{calls} waits in 0.3 s: the follower spins once its producer ended"


def test_wait_returns_as_soon_as_a_block_is_marked() -> None:
    progress = Progress("predict")
    progress.start(plan_blocks(Roi((0, 0, 0), (4, 8, 8)), (2, 8, 8)))
    threading.Timer(0.05, progress.mark, args=([0],)).start()
    start = time.perf_counter()
    progress.wait(5.0)
    assert time.perf_counter() - start < 2.0
