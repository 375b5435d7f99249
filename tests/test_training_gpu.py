"""The worker's CuPy path end to end: GPU workers train the demos on a local cluster.

Skipped, with the reason shown, where cupy or a CUDA GPU is missing (the ``cp`` fixture).
"""

from __future__ import annotations

import pytest

import ps
from ps.demo import demo_spec

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model,target", [("mlp", 0.95), ("cnn", 0.97)])
def test_gpu_workers_train_the_demo_to_its_target(cp, model, target):
    with ps.LocalCluster(servers=2, workers=2, worker_args=["--device", "gpu:0"]) as cluster, \
            ps.Client(cluster.address) as client:
        job = client.submit(demo_spec(model))
        trained = job.wait(progress=False, timeout=300)
        assert job.status() == "succeeded"
        assert trained.metrics["test_accuracy"] >= target, trained.metrics
        # Every worker registered with the scheduler as a GPU worker (it reports its device then).
        devices = sorted(w.device for w in client.cluster().workers)
        assert devices == ["gpu:0", "gpu:0"], devices
