"""The docker-compose cluster on separate network hosts, without Docker: one Linux network
namespace per service instance, joined by a bridge, each process started with the compose
file's own `command:` and `environment:`.

How service names resolve: `ip netns exec NS` bind-mounts every file in /etc/netns/NS/ over
/etc/ for the command it runs (iproute2's documented per-namespace config), so each namespace
gets an /etc/hosts that maps `scheduler`, `server-0`, ... to their bridge addresses, like
Docker's embedded DNS. The compose commands and environments therefore run unchanged
(`PS_SCHEDULER=scheduler:7070`, `PS_ADVERTISE=server-0:7000`). The test itself stays in the
host namespace, with an address on the bridge, and reaches the scheduler the way a user of the
compose cluster reaches the published port: by address, without the service names.

Only addresses this test creates are used: a /24 in 10.213.0.0/16 on a bridge of its own, with
no route anywhere else. Needs root and iproute2 (`apt-get install iproute2`)."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
PARAMSERVER = [sys.executable, "-m", "ps"]  # the image's ENTRYPOINT, from this environment
VOLUME_ROOT = "/var/lib/paramserver/"  # where the compose file mounts its volumes
_TOPOLOGY_IDS = itertools.count()

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _why_not() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (run as root, as .ci/run does)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (apt-get install -y iproute2)"
    return None


if _why_not():
    pytestmark.append(pytest.mark.skip(reason=_why_not()))


def _run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, env=os.environ):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and $$, applied to strings in a value."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(0) == "$$":
                return "$"
            name = m.group(1) or m.group(3)
            default = m.group(2)
            got = env.get(name)
            if got is None or (got == "" and ":-" in m.group(0)):
                return default or ""
            return got
        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, os.environ.get(item, "")) for item in env)
    return {k: "" if v is None else str(v) for k, v in interpolate(env).items()}


def _command(args) -> list[str]:
    """The container's argv after the entrypoint: the exec form as is, a string split like sh."""
    import shlex
    return shlex.split(args) if isinstance(args, str) else [str(a) for a in args]


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """What a container would see: none of this shell's PS_* settings or proxies (gRPC honours
    http_proxy, and a container has none), plus the compose environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_") and "proxy" not in k.lower()}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


@dataclass
class Instance:
    """One container's worth of a service: its namespace, address and process."""
    service: str
    name: str
    netns: str
    veth: str
    ip: str
    command: list[str]
    environment: dict[str, str]
    healthcheck: list[str] | None
    proc: subprocess.Popen | None = None
    log: Path | None = None


@dataclass
class Topology:
    """Namespaces, bridge and processes for the services of a compose file; removes them all."""
    compose: dict
    workdir: Path
    tag: str = field(default_factory=lambda: f"ps{os.getpid()}{'abcdefghij'[next(_TOPOLOGY_IDS) % 10]}")
    instances: dict[str, Instance] = field(default_factory=dict)
    bridge: str = ""
    _accept: list = field(default_factory=list)  # the iptables rule that lets the bridge's traffic through
    host_ip: str = ""
    _created_netns: list[str] = field(default_factory=list)

    def _subnet(self) -> ipaddress.IPv4Network:
        used = set(re.findall(r"inet (10\.213\.\d+)\.", _run("ip", "-4", "-o", "addr").stdout))
        for i in range(256):
            third = (os.getpid() + i) % 254 + 1
            if f"10.213.{third}" not in used:
                return ipaddress.ip_network(f"10.213.{third}.0/24")
        raise RuntimeError("no free /24 in 10.213.0.0/16")

    def create(self, services: list[str]) -> None:
        """A bridge with the host at .1 and one namespace per instance of ``services``."""
        subnet = self._subnet()
        hosts = subnet.hosts()
        self.bridge = f"{self.tag}br"
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self.host_ip = str(next(hosts))
        _run("ip", "addr", "add", f"{self.host_ip}/{subnet.prefixlen}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        # On a host running Docker, FORWARD's policy is DROP and (br_netfilter loaded) traffic between a
        # bridge's ports passes through FORWARD: let ours through; the rule goes with the bridge.
        if shutil.which("iptables"):
            self._accept = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
            _run("iptables", "-I", *self._accept, check=False)
        for service in services:
            spec = self.compose["services"][service]
            replicas = int((spec.get("deploy") or {}).get("replicas", 1))
            for r in range(1, replicas + 1):
                name = service if replicas == 1 else f"{service}-{r}"
                n = len(self.instances)
                inst = Instance(service, name, f"{self.tag}-{name}", f"{self.tag}v{n}", str(next(hosts)),
                                _command(spec.get("command", [])), _environment(spec),
                                _command(spec["healthcheck"]["test"]) if "healthcheck" in spec else None)
                self.instances[name] = inst
                self._add_netns(inst, subnet.prefixlen)
        # Docker's DNS answers a service name with its containers and each container's name.
        lines = ["127.0.0.1 localhost"]
        for inst in self.instances.values():
            lines.append(f"{inst.ip} {inst.service}" + (f" {inst.name}" if inst.name != inst.service else ""))
        for inst in self.instances.values():
            etc = Path("/etc/netns") / inst.netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("\n".join(lines + [f"{inst.ip} {inst.name}-host"]) + "\n")

    def _add_netns(self, inst: Instance, prefixlen: int) -> None:
        _run("ip", "netns", "add", inst.netns)
        self._created_netns.append(inst.netns)
        _run("ip", "-n", inst.netns, "link", "set", "lo", "up")
        _run("ip", "link", "add", inst.veth, "type", "veth", "peer", "name", f"{inst.veth}p",
             "netns", inst.netns)
        _run("ip", "-n", inst.netns, "link", "set", f"{inst.veth}p", "name", "eth0")
        _run("ip", "-n", inst.netns, "addr", "add", f"{inst.ip}/{prefixlen}", "dev", "eth0")
        _run("ip", "-n", inst.netns, "link", "set", "eth0", "up")
        _run("ip", "link", "set", inst.veth, "master", self.bridge)
        _run("ip", "link", "set", inst.veth, "up")

    def exec(self, inst: Instance, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """Run ``argv`` (with `paramserver` as in the image) inside ``inst``'s namespace."""
        if argv and argv[0] == "paramserver":
            argv = PARAMSERVER + argv[1:]
        return subprocess.run(["ip", "netns", "exec", inst.netns, *argv], capture_output=True, text=True,
                              env=_clean_env(self._volumes(inst.environment)), timeout=timeout)

    def _volumes(self, env: dict[str, str]) -> dict[str, str]:
        """The compose file's volumes (mounted under /var/lib/paramserver) as fresh directories of
        this topology, shared by its instances as named volumes are."""
        root = self.workdir / "volumes"
        return {k: str(root / v[len(VOLUME_ROOT):]) if v.startswith(VOLUME_ROOT) else v for k, v in env.items()}

    def start(self, inst: Instance) -> None:
        """The service's command and environment, as the compose file gives them."""
        inst.log = self.workdir / f"{inst.name}.log"
        home = self.workdir / f"{inst.name}-home"  # each container has a home of its own (the scheduler's state)
        home.mkdir(exist_ok=True)
        with open(inst.log, "wb") as log:
            inst.proc = subprocess.Popen(["ip", "netns", "exec", inst.netns, *PARAMSERVER, *inst.command],
                                         env=_clean_env({**self._volumes(inst.environment), "HOME": str(home)}),
                                         stdout=log,
                                         stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def healthy(self, inst: Instance) -> bool:
        """The compose healthcheck, run where Docker runs it: inside the container."""
        assert inst.healthcheck and inst.healthcheck[0] == "CMD", inst.healthcheck
        return self.exec(inst, inst.healthcheck[1:], timeout=15).returncode == 0

    def wait_healthy(self, inst: Instance, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy(inst):
            if inst.proc is not None and inst.proc.poll() is not None:
                raise AssertionError(f"{inst.name} exited {inst.proc.returncode}\n{self.tail(inst)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{inst.name} not healthy after {timeout:g} s\n{self.tail(inst)}")
            time.sleep(0.3)

    def up(self, timeout: float = 60) -> None:
        """Start instances in depends_on order, waiting on `service_healthy` like compose does."""
        started: set[str] = set()
        pending = list(dict.fromkeys(i.service for i in self.instances.values()))
        while pending:
            for service in pending:
                deps = self.compose["services"][service].get("depends_on") or {}
                if isinstance(deps, list):
                    deps = {d: {"condition": "service_started"} for d in deps}
                if set(deps) <= started:
                    break
            else:
                raise AssertionError(f"depends_on cycle or missing service among {pending}")
            for dep, cond in deps.items():
                if cond.get("condition") == "service_healthy":
                    for inst in self.of(dep):
                        self.wait_healthy(inst, timeout)
            for inst in self.of(service):
                self.start(inst)
            started.add(service)
            pending.remove(service)

    def of(self, service: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.service == service]

    def address(self, service: str) -> str:
        """host:port for reaching ``service`` from the host, as through its published port."""
        (inst,) = self.of(service)
        target = str(self.compose["services"][service]["ports"][0]).rsplit(":", 1)[-1]
        return f"{inst.ip}:{target}"

    def tail(self, inst: Instance | None = None, lines: int = 40) -> str:
        out = []
        for i in [inst] if inst else self.instances.values():
            if i.log and i.log.exists():
                text = i.log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {i.name} ({i.ip}) ---\n" + "\n".join(text))
        return "\n".join(out)

    def destroy(self) -> None:
        """Stop every process group (SIGTERM, then SIGKILL), delete namespaces, veths, bridge."""
        procs = [i.proc for i in self.instances.values() if i.proc and i.proc.poll() is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        for inst in self.instances.values():
            _run("ip", "link", "del", inst.veth, check=False)
            shutil.rmtree(Path("/etc/netns") / inst.netns, ignore_errors=True)
        for ns in self._created_netns:
            _run("ip", "netns", "del", ns, check=False)
        if self.bridge:
            _run("ip", "link", "del", self.bridge, check=False)
        if self._accept:
            _run("iptables", "-D", *self._accept, check=False)


@pytest.fixture
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture
def hosts(compose, tmp_path):
    """A factory: ``hosts(["scheduler", "server-0"])`` builds and starts those services, each
    instance in a namespace of its own; everything is removed afterwards, even on failure."""
    topologies: list[Topology] = []

    def make(services: list[str] | None = None) -> Topology:
        if services is None:  # what `docker compose up` starts: every service outside a profile
            services = [s for s, spec in compose["services"].items() if not spec.get("profiles")]
        topo = Topology(compose, tmp_path)
        topologies.append(topo)
        topo.create(services)
        topo.up()
        return topo

    yield make
    for topo in topologies:
        topo.destroy()


def paramserver(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The CLI as a user on the Docker host runs it: in the host namespace."""
    return subprocess.run([*PARAMSERVER, *args], capture_output=True, text=True, env=_clean_env({}),
                          timeout=timeout)


def last_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


def test_namespaced_scheduler_and_servers_find_each_other_by_service_name(hosts):
    topo = hosts(["scheduler", "server-0", "server-1"])
    scheduler = topo.address("scheduler")
    assert paramserver("health", scheduler).stdout.strip() == "SERVING"

    def servers_up() -> dict | None:
        proc = paramserver("status", scheduler, "--json", timeout=30)
        view = last_json(proc.stdout) if proc.returncode == 0 else {}
        up = {s["address"] for s in view.get("servers", []) if s.get("state") == "up"}
        return view if up == {"server-0:7000", "server-1:7000"} else None

    deadline = time.monotonic() + 30
    while not (view := servers_up()):
        assert time.monotonic() < deadline, f"2 servers never came up\n{topo.tail()}"
        time.sleep(0.3)
    assert len(view["servers"]) == 2
    # Each namespace reaches the others by service name, over the bridge, not loopback.
    (sched,) = topo.of("scheduler")
    for name in ("server-0", "server-1"):
        proc = topo.exec(sched, ["paramserver", "health", f"{name}:7000"])
        assert proc.returncode == 0, proc.stderr
    # ...and only over the bridge: a shard's own loopback does not serve the scheduler's port.
    (s0,) = topo.of("server-0")
    assert topo.exec(s0, ["paramserver", "health", "localhost:7070", "--timeout", "2"]).returncode != 0


def _demo(scheduler: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*PARAMSERVER, "demo", "--scheduler", scheduler, "--json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_clean_env({}),
                            start_new_session=True)


def _finish(proc: subprocess.Popen, topo: Topology, timeout: float = 300) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"demo still running after {timeout:g} s\n{err[-3000:]}\n{topo.tail()}")
    assert proc.returncode == 0, f"demo exited {proc.returncode}\n{err[-3000:]}\n{topo.tail()}"
    return last_json(out)


def test_demo_trains_on_the_compose_cluster_spread_over_five_hosts(hosts):
    topo = hosts()
    assert len(topo.of("worker")) == 2
    result = _finish(_demo(topo.address("scheduler")), topo)
    assert result["test_accuracy"] >= 0.95, result
    assert result["samples_per_s"] > 0 and result["seconds"] > 0


def test_demo_succeeds_when_a_workers_link_is_cut_mid_job(hosts):
    topo = hosts()
    scheduler = topo.address("scheduler")
    # A short lease so the cut worker's task goes back to the queue within seconds.
    demo = _demo(scheduler, "--lease-timeout", "5")
    try:
        deadline = time.monotonic() + 120
        while True:
            assert demo.poll() is None, f"demo ended before any progress was seen\n{demo.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, f"no job made progress within 120 s\n{topo.tail()}"
            proc = paramserver("jobs", "--scheduler", scheduler, "--json", timeout=30)
            jobs = last_json(proc.stdout)["jobs"] if proc.returncode == 0 else []
            if any(j["state"] == "running" and 0 < j["tasks_done"] < j["tasks_total"] for j in jobs):
                break
            time.sleep(0.2)
        victim = topo.of("worker")[-1]
        _run("ip", "link", "set", victim.veth, "down")
        cut = topo.exec(victim, ["paramserver", "health", "scheduler:7070", "--timeout", "2"])
        assert cut.returncode != 0, f"{victim.name} still reaches the scheduler after its link went down"
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(demo.pid, signal.SIGKILL)
        raise
    result = _finish(demo, topo)
    assert result["test_accuracy"] >= 0.95, result
