"""Shared fixtures: real processes on loopback, always cleaned up."""

from __future__ import annotations

import os
import time
import uuid

import fsspec
import numpy as np

import pytest

import ps


@pytest.fixture(autouse=True)
def _scheduler_state_dir(tmp_path_factory, monkeypatch):
    """A scheduler a test starts by hand keeps its state in a fresh dir of its own, not in the
    user's (LocalCluster gives its scheduler one in its workdir anyway)."""
    monkeypatch.setenv("PS_STATE_DIR", str(tmp_path_factory.mktemp("scheduler-state")))


@pytest.fixture(scope="module")
def cluster():
    """A scheduler and two servers as real processes, for the tests of one module."""
    with ps.LocalCluster(servers=2) as c:
        yield c


@pytest.fixture(scope="session")
def cp():
    """The cupy module with a CUDA GPU behind it. Without one the test is skipped with the reason
    shown, unless PS_REQUIRE_GPU=1 (as .ci/gpu-check sets): then it fails, so a GPU host whose
    cupy is missing or broken cannot pass the GPU checks by skipping them."""
    def missing(why: str):
        if os.environ.get("PS_REQUIRE_GPU") == "1":
            pytest.fail(f"PS_REQUIRE_GPU=1 but {why}", pytrace=False)
        pytest.skip(why)
    try:
        import cupy
    except ImportError as e:
        missing(f"no cupy: {e}")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, or a CUDA runtime that cannot start
        missing(f"no CUDA GPU: {type(e).__name__}: {e}")
    if count == 0:
        missing("no CUDA GPU: cupy sees 0 devices")
    return cupy


@pytest.fixture
def client(cluster):
    with ps.Client(cluster.address) as c:
        yield c


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def versions(client, model: str) -> set[int]:
    """The update counts of every slice of ``model`` on its primaries (one value: every slice took
    every update)."""
    return {v for s in client.model(model).stats() for v in (s.min_version, s.max_version)}


def task_batches(info, batch_size: int) -> list[int]:
    """The batches of each train task of an epoch of the job ``info`` describes (a JobInfo)."""
    import json
    import math
    from ps.worker.preprocess import shard_ranges
    prep = json.loads(info.prep_json)
    return [math.ceil((hi - lo) / batch_size) for lo, hi in shard_ranges(prep["n_train"], prep["shards"])]


def wait_for_tasks(job, done: int) -> None:
    """Follow the job's progress events until ``done`` of its tasks have finished."""
    for ev in job.events(timeout=120):
        if ev.tasks_done >= done:
            return
    pytest.fail(f"job {job.job_id} ended before {done} tasks were done")


@pytest.fixture
def mem():
    """A fresh memory:// folder, removed afterwards; returns a function naming a file in it."""
    root = f"memory://test-{uuid.uuid4().hex}"
    yield lambda name: f"{root}/{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def put(uri: str, data: bytes | str) -> str:
    with fsspec.open(uri, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return uri


def numeric_grad(f, a: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar ``f()`` wrt every element of ``a`` (perturbed in place)."""
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        old = a[idx]
        a[idx] = old + eps
        plus = f()
        a[idx] = old - eps
        minus = f()
        a[idx] = old
        g[idx] = (plus - minus) / (2 * eps)
    return g


def rel_error(analytic, numeric) -> float:
    analytic, numeric = np.asarray(analytic, np.float64), np.asarray(numeric, np.float64)
    scale = max(np.abs(analytic).max(initial=0), np.abs(numeric).max(initial=0), 1e-12)
    return float(np.abs(analytic - numeric).max(initial=0) / scale)
