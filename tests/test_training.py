"""Training end to end with real scheduler, server and worker processes over gRPC."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import ps
from ps.demo import demo_spec
from ps.reference import train_local
from ps.tblog import read_scalars
from ps.worker.datasets import load_builtin

from conftest import task_batches, versions, wait_for, wait_for_tasks


@pytest.fixture(scope="module")
def cluster():
    with ps.LocalCluster(servers=2, workers=2) as c:
        yield c


def small_mlp(**kw) -> ps.JobSpec:
    spec = demo_spec("mlp", epochs=kw.pop("epochs", 4))
    for k, v in kw.items():
        setattr(spec, k, v)
    return spec


def run_cli(*args: str, timeout: float = 300) -> dict:
    out = subprocess.run([sys.executable, "-m", "ps", *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_demo_trains_an_mlp_to_95_percent_on_held_out_digits():
    result = run_cli("demo", "--json")
    assert result["test_accuracy"] >= 0.95, result
    assert result["samples_per_s"] > 0 and result["seconds"] < 120


def test_demo_trains_a_cnn_to_97_percent_on_held_out_digits():
    result = run_cli("demo", "--model", "cnn", "--json")
    assert result["test_accuracy"] >= 0.97, result
    assert result["seconds"] < 120


def test_submit_wait_save_and_predict_locally(cluster, tmp_path):
    with ps.Client(cluster.address) as client:
        job = client.submit(small_mlp(epochs=5))
        seen = [(e.kind, e.state, e.metrics.epoch) for e in job.events()]
        model = job.wait(progress=False, logdir=str(tmp_path / "tb"))
        assert job.status() == "succeeded"
        assert [s for k, s, _ in seen if k == "state"] == ["queued", "starting", "running", "succeeded"]
        epochs = [e for k, _, e in seen if k == "epoch"]
        assert sorted(epochs) == [1, 2, 3, 4, 5]
        assert model.metrics["test_accuracy"] >= 0.9
        assert job.metrics()["test_accuracy"] == model.metrics["test_accuracy"]
        path = job.save(str(tmp_path / "model"))
        loaded = ps.load_model(path)
        for k, v in job.weights().items():
            np.testing.assert_array_equal(loaded.weights[k], v)
        digits = load_builtin("digits")
        from ps.worker.preprocess import train_test_split
        _, test_idx = train_test_split(len(digits.x), 0.3, 0)
        pred = loaded.predict(digits.x[test_idx])  # raw pixels: the saved scaler is applied
        accuracy = float((pred == digits.y[test_idx]).mean())
        proba = loaded.predict_proba(digits.x[test_idx])
        assert proba.shape == (len(test_idx), 10)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
        np.testing.assert_array_equal(proba.argmax(axis=1), pred)
        assert accuracy == pytest.approx(model.metrics["test_accuracy"], abs=0.02)
        curves = read_scalars(tmp_path / "tb" / job.job_id)
        assert [s for s, _ in curves["test/accuracy"]] == [1, 2, 3, 4, 5]
        assert curves["test/accuracy"][-1][1] == pytest.approx(model.metrics["test_accuracy"], abs=1e-6)


def test_several_jobs_run_at_once_each_with_its_own_model(cluster):
    with ps.Client(cluster.address) as client:
        jobs = [client.submit(small_mlp(epochs=3, seed=s)) for s in (1, 2)]
        models = [j.wait(progress=False) for j in jobs]
        assert all(m.metrics["test_accuracy"] >= 0.85 for m in models)
        names = {m.model for s in client.cluster().servers for m in client.stats(s.address).models}
        assert {j.job_id for j in jobs} <= names
        assert not np.array_equal(models[0].weights["0.dense.w"], models[1].weights["0.dense.w"])


SCHEMA_ERRORS = [
    ({"loss": "hinge"}, "spec.loss: unknown loss 'hinge'"),
    ({"batch_size": 0}, "spec.batch_size: expected a positive int, got 0"),
    ({"optimizer": {"name": "adamz"}}, "spec.optimizer: unknown optimizer 'adamz'"),
    ({"epochz": 3}, "spec.epochz: unknown field"),
]


@pytest.mark.parametrize("change,message", SCHEMA_ERRORS, ids=["unknown-loss", "batch-size", "optimizer",
                                                               "unknown-field"])
def test_specs_that_break_the_schema_are_rejected_at_submit_and_start_nothing(cluster, change, message):
    spec = small_mlp().to_dict()
    spec.update(change)
    with ps.Client(cluster.address) as client:
        before = len(client.jobs())
        with pytest.raises(ps.InvalidArgument) as err:
            client.submit(spec)
        assert message in str(err.value)
        assert len(client.jobs()) == before


DATA_ERRORS = [
    ({"model": [{"type": "dense", "units": 10}, {"type": "foo"}]}, "spec.model: layer 1: unknown layer type 'foo'"),
    ({"model": [{"type": "conv2d", "filters": 4, "kernel": 3}]}, "spec.model: layer 0"),
    ({"data": {"uri": "/nonexistent/data.csv"}}, "spec.data.uri: "),
    ({"model": [{"type": "dense", "units": 5}]}, "spec.data: label 5 at row"),
]


@pytest.mark.parametrize("change,message", DATA_ERRORS, ids=["unknown-layer", "shapes-dont-chain", "missing-file",
                                                             "label-out-of-range"])
def test_specs_that_dont_fit_their_data_fail_the_job_at_its_first_task(cluster, change, message):
    """The scheduler reads no data: a worker inspects it as the job's first task, and its error
    fails the job with the same field-naming message; no parameters are created."""
    spec = small_mlp().to_dict()
    spec.update(change)
    with ps.Client(cluster.address) as client:
        job = client.submit(spec)
        with pytest.raises(ps.JobFailed) as err:
            job.wait(progress=False, timeout=60)
        assert job.info().error.startswith(message) and message in str(err.value)
        assert [e.state for e in job.events() if e.kind == "state"] == ["queued", "failed"]
        held = {m.model for s in client.cluster().servers for m in client.stats(s.address).models}
        assert job.job_id not in held and job.job_id not in client.cluster().models


def test_unparsable_csv_fails_the_job_naming_the_value(cluster, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,label\n1,2,0\n3,oops,1\n")
    spec = small_mlp().to_dict()
    spec.update(data={"uri": str(bad), "label": "label"}, model=[{"type": "dense", "units": 2}])
    with ps.Client(cluster.address) as client:
        with pytest.raises(ps.JobFailed, match="oops"):
            client.submit(spec).wait(progress=False, timeout=60)


def test_cancel_stops_tasks_and_frees_parameters_on_every_server(cluster):
    with ps.Client(cluster.address) as client:
        job = client.submit(small_mlp(epochs=200))
        wait_for_tasks(job, 2)
        job.cancel()
        assert job.status() == "cancelled"
        servers = [s.address for s in client.cluster().servers]
        wait_for(lambda: all(job.job_id not in {m.model for m in client.stats(a).models} for a in servers),
                 timeout=30, what="the cancelled job's parameters to be freed")
        done = job.info().tasks_done
        # The workers move on: a new job runs to completion on the same cluster.
        assert client.submit(small_mlp(epochs=1)).wait(progress=False).metrics["epoch"] == 1
        assert job.info().tasks_done == done
        with pytest.raises(ps.FailedPrecondition, match="already cancelled"):
            job.cancel()


def test_a_worker_killed_mid_job_costs_time_not_the_job():
    with ps.LocalCluster(servers=2, workers=2) as c, ps.Client(c.address) as client:
        spec = demo_spec("mlp", lease_timeout_s=2.0)
        job = client.submit(spec)
        wait_for_tasks(job, 3)
        c.workers[0].kill()  # SIGKILL
        model = job.wait(progress=False)
        info = job.info()
        applied = versions(client, job.job_id)
    assert model.metrics["test_accuracy"] >= 0.95
    # Nothing acknowledged was lost: every slice holds the updates of every task reported done, plus at
    # most those the killed worker pushed in the task it never reported (run again by the other worker).
    batches = task_batches(info, spec.batch_size)
    m = info.metrics
    assert m.duplicates == 0 and info.tasks_done == info.tasks_total
    assert m.steps == spec.epochs * sum(batches)  # each task's steps counted once, from the lease that finished it
    assert m.steps <= min(applied) and max(applied) <= m.steps + max(batches), (m.steps, applied, batches)


def test_a_large_held_out_split_is_evaluated_in_parts_that_add_up_to_the_whole(cluster):
    """9,000 held-out examples and 2 workers: each epoch's test metrics come from 2 eval tasks run side by
    side, and add up to exactly what the trained weights score on the whole split."""
    from ps.worker.inspect import load_data
    from ps.worker.preprocess import train_test_split
    spec = ps.JobSpec.from_dict({
        "name": "parts", "model": [{"type": "dense", "units": 16, "activation": "relu"}, {"type": "dense", "units": 3}],
        "data": {"uri": "synthetic:classification?n=30000&features=8&classes=3&seed=1"},
        "optimizer": {"name": "adam", "lr": 0.01}, "batch_size": 512, "epochs": 2, "workers": 2})
    with ps.Client(cluster.address) as client:
        job = client.submit(spec)
        trained = job.wait(progress=False, timeout=300)
        info = job.info()
        epochs = [e.message.split(":")[0] for e in job.events() if e.kind == "epoch"]
    assert info.tasks_total == info.tasks_done == 2 * (4 + 2)  # 4 train tasks (asp) and 2 eval parts an epoch
    assert epochs == ["epoch 1/2", "epoch 2/2"]  # one report an epoch, once both parts are in
    ds = load_data(spec)
    _, test_idx = train_test_split(len(ds.x), spec.data.test_fraction, spec.seed)
    assert len(test_idx) == 9000
    correct = int((trained.predict(ds.x[test_idx]).reshape(-1) == ds.y[test_idx]).sum())
    assert trained.metrics["test_accuracy"] == correct / 9000


def test_data_that_vanishes_after_submit_fails_the_job_naming_the_file(tmp_path):
    data = tmp_path / "data.csv"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3))
    data.write_text("a,b,c,y\n" + "\n".join(f"{a},{b},{c},{int(a > 0)}" for a, b, c in x))
    spec = small_mlp().to_dict()
    spec.update(data={"uri": str(data), "label": "y"}, model=[{"type": "dense", "units": 2}])
    with ps.LocalCluster(servers=1, workers=0) as c, ps.Client(c.address) as client:
        job = client.submit(spec)  # schema-checked only: the scheduler reads no data
        data.unlink()              # the file vanishes before any worker reads it
        warning = next(e for e in job.events() if e.kind == "warning")
        assert "no workers are registered with the scheduler" in warning.message
        c.add_worker()
        with pytest.raises(ps.JobFailed) as err:
            job.wait(progress=False, timeout=60)
        assert f"spec.data.uri: no such dataset file: {data}" in str(err.value)
        assert job.status() == "failed"


def test_binary_csv_job_matches_a_single_process_numpy_loop(cluster, tmp_path):
    rng = np.random.default_rng(3)
    n, d = 4000, 12
    teacher = rng.standard_normal(d)
    x = rng.standard_normal((n, d)) * rng.uniform(0.5, 3, d) + rng.uniform(-2, 2, d)
    logits = ((x - x.mean(0)) / x.std(0)) @ teacher + 0.8 * rng.standard_normal(n)
    y = (logits > 0).astype(int)
    path = tmp_path / "binary.csv"
    path.write_text(",".join([f"f{i}" for i in range(d)] + ["target"]) + "\n" +
                    "\n".join(",".join(f"{v:.6f}" for v in row) + f",{t}" for row, t in zip(x, y)))
    spec = ps.JobSpec.from_dict({
        "name": "binary", "model": [{"type": "dense", "units": 16, "activation": "relu"}, {"type": "dense", "units": 1}],
        "loss": "binary_cross_entropy", "data": {"uri": str(path), "label": "target"},
        "optimizer": {"name": "adam", "lr": 0.005}, "batch_size": 32, "epochs": 10, "seed": 1})
    reference = train_local(spec)["test_accuracy"]
    with ps.Client(cluster.address) as client:
        trained = client.submit(spec).wait(progress=False)
    got = trained.metrics["test_accuracy"]
    predicted = trained.predict(x)  # raw features; the saved scaler is applied
    assert set(np.unique(predicted)) <= {0, 1}
    assert float((predicted.reshape(-1) == y).mean()) > 0.8
    assert reference > 0.8
    assert abs(got - reference) <= 0.01, (got, reference)
