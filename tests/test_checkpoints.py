"""Checkpoints: safetensors per shard plus a manifest, atomic, optimizer state included; a job
resumed from one continues where it was, even after every server was lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

import ps
from ps import checkpoint
from ps.demo import demo_spec
from ps.errors import InvalidArgument, NotFound

from conftest import wait_for
from test_peers import ps_cmd

FAST = ["--heartbeat-interval", "0.25", "--server-timeout", "1.5"]


def adam_model(client, name):
    return client.create_model(name, {"w": np.zeros(700_000, np.float32), "b": np.zeros(10, np.float32)},
                               optimizer={"name": "adam", "lr": 0.01})


def test_a_resumed_adam_continues_exactly_as_an_uninterrupted_one(cluster, client, tmp_path):
    rng = np.random.default_rng(0)
    grads = [{"w": rng.standard_normal(700_000).astype(np.float32), "b": rng.standard_normal(10).astype(np.float32)}
             for _ in range(6)]
    ref, first = adam_model(client, "ref"), adam_model(client, "first")
    for g in grads[:3]:
        ref.push(g)
        first.push(g)
    manifest = checkpoint.take(client, "first", str(tmp_path / "ckpt"))
    assert sorted(f["name"] for f in manifest["files"]) == ["shard-0.safetensors", "shard-1.safetensors"]
    assert {s["version"] for s in manifest["slices"]} == {3}
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["manifest.json", "shard-0.safetensors", "shard-1.safetensors"]
    first.delete()
    resumed = client.restore_model("resumed", str(tmp_path / "ckpt"))
    assert min(s.min_version for s in resumed.stats() if s.slices) == 3
    for g in grads[3:]:
        ref.push(g)
        resumed.push(g)
    want, got = ref.pull(), resumed.pull()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6)
        assert got[k].tobytes() == want[k].tobytes(), k  # the same arithmetic, in fact bit-equal


def test_a_checkpoint_missing_its_manifest_or_a_whole_file_is_refused(cluster, client, tmp_path):
    adam_model(client, "partial").push({"b": np.ones(10, np.float32)})
    url = str(tmp_path / "ckpt")
    checkpoint.take(client, "partial", url)
    shard = tmp_path / "ckpt" / "shard-0.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:len(whole) // 2])  # a shard file cut short
    with pytest.raises(InvalidArgument, match=f"shard-0.safetensors has {len(whole) // 2} bytes, the manifest says "
                                              f"{len(whole)}"):
        client.restore_model("again", url)
    shard.write_bytes(whole)
    os.remove(tmp_path / "ckpt" / "manifest.json")  # the manifest is written last: never got there
    with pytest.raises(NotFound, match="no manifest.json"):
        client.restore_model("again", url)
    assert "again" not in client.cluster().models
    assert not list(tmp_path.glob("ckpt/.*tmp*")), "no temporary file is left behind"


EPOCHS = 30  # the job must still be running when the first checkpoint's event arrives


def test_a_job_resumes_from_its_checkpoint_after_every_server_is_lost(tmp_path):
    """Periodic checkpoints every epoch; kill -9 both servers mid-job: the job fails saying which
    shard is lost and where its last checkpoint is. New servers, `submit --resume`: the job picks up
    after the checkpoint's epoch and reaches its target."""
    with ps.LocalCluster(servers=2, workers=2, scheduler_args=FAST) as cluster, ps.Client(cluster.address) as client:
        spec = demo_spec("mlp", epochs=EPOCHS)
        spec.checkpoint_every_epochs = 2
        job = client.submit(spec)
        written = None
        for ev in job.events(timeout=300):
            if ev.kind == "checkpoint":
                written = ev.message.rsplit(" written to ", 1)[1]
                break
        # the workers are stopped first: the job cannot finish before its servers are gone (the rest of
        # it took half a second once; now it waits, as on a cluster that loses its servers mid-job)
        for w in cluster.workers:
            w.popen.send_signal(signal.SIGSTOP)
        assert written and ev.metrics.epoch >= 2
        for p in list(cluster.servers):
            p.kill()
        wait_for(lambda: job.status() == "failed", 60, what="the job to fail")
        for w in cluster.workers:
            w.popen.send_signal(signal.SIGCONT)
        error = job.info().error
        assert "of its parameters is lost" in error and "paramserver submit --resume" in error
        last = error.rsplit("--resume ", 1)[1]
        manifest = checkpoint.read_manifest(last)
        assert manifest["job_id"] == job.job_id and manifest["epoch"] >= 2

        deadline = time.monotonic() + 60
        for _ in range(2):
            cluster.add_server(deadline)
        cluster.wait_servers(2, deadline)
        out = subprocess.run(ps_cmd("submit", "--resume", last, "--scheduler", cluster.address, "--follow",
                                    "--json"), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["state"] == "succeeded" and result["test_accuracy"] >= 0.9
        resumed = client.job(result["job_id"])
        info = resumed.info()
        assert info.metrics.epoch == EPOCHS and info.tasks_done == info.tasks_total
        # it ran only the epochs after the checkpoint's (and no inspection)
        started = [e for e in resumed.events() if e.kind == "state"][0]
        assert started.message == f"resumed from {last} after epoch {manifest['epoch']}"

        # on demand, from the command line, of the finished job (its parameters are still there)
        out = subprocess.run(ps_cmd("checkpoint", result["job_id"], "--scheduler", cluster.address, "--json"),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        taken = json.loads(out.stdout.strip().splitlines()[-1])
        assert taken["epoch"] == EPOCHS and checkpoint.read_manifest(taken["url"])["epoch"] == EPOCHS
