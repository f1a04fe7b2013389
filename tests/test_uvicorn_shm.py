"""shm:// under ``uvicorn --workers 4``: 200 concurrent requests from one client
at 10/minute, exactly 10 answered 200 and 190 answered 429 (a real denial,
Retry-After 6 or more, never the failure mode's 1), in each of 10 runs.

The workers are unrelated processes sharing nothing but the segment; each
run is a fresh client (its own loopback source address).  The app is
tests/shm_app.py.  RATEGATE_SHM_WORKER_RUNS sets the runs (default 10).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

import rategate
from test_uvicorn import Uvicorn
from test_uvicorn_workers import check, one_run, warm_workers

RUNS = int(os.environ.get("RATEGATE_SHM_WORKER_RUNS", "10"))


@pytest.fixture
def shm_name() -> Iterator[str]:
    name = f"uvi{os.getpid()}-{time.monotonic_ns()}"
    yield name
    rategate.shm_unlink(name)


def test_four_workers_share_one_shm_limit(shm_name: str) -> None:
    srv = Uvicorn("shm_app:app", workers=4, env={"RATEGATE_SHM_URL": f"shm://{shm_name}"})
    try:
        pids = warm_workers(srv, "127.0.0.39", 4)
        print(f"\nworkers answering: {len(pids)}")
        for i in range(RUNS):
            check(one_run(srv, f"127.0.0.{40 + i}", 200), n=200, limit=10)
    finally:
        srv.stop()
    # One bucket per client in the segment, each emptied (10 tokens of 6 s:
    # full again within 60 s of its run).
    lim = rategate.Limiter(f"shm://{shm_name}")
    got = {k: (i, v) for k, i, v in lim._engine.entries(b"/limited|127.0.0.")}
    assert set(got) == {f"/limited|127.0.0.{40 + i}".encode() for i in range(RUNS)}
    assert all(i == b"10/60000" and 0 < v <= 60e6 for i, v in got.values())
    lim.close()
