"""LocalCluster: a scheduler, N servers (and, with training, M workers) as real processes on
free loopback ports, always cleaned up."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ps import rpc
from ps.v1 import scheduler_pb2, scheduler_pb2_grpc


#: what a LocalCluster's processes take from it, not from the environment it was started in
SECURITY_VARIABLES = ("PS_TLS_CERT", "PS_TLS_KEY", "PS_TLS_CA", "PS_TOKEN_FILE", "PS_AUTH_FILE")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Process:
    """One role's process, its log file and the port it reported."""

    def __init__(self, name: str, args: list[str], workdir: Path, env: dict | None = None,
                 module: str = "ps", listens: bool = True):
        """Run ``python -m module *args`` (a listening process also gets ``--port-file``)."""
        self.name = name
        self.log = workdir / f"{name}.log"
        self.port_file = workdir / f"{name}.port"
        self.port: int | None = None
        # the cluster's own security settings (env), never those this process happens to run with
        inherited = {k: v for k, v in os.environ.items() if k not in SECURITY_VARIABLES}
        full_env = dict(inherited, PYTHONUNBUFFERED="1", **(env or {}))
        port_args = ["--port-file", str(self.port_file)] if listens else []
        self.port_file.unlink(missing_ok=True)  # a restart under the same name reports its port afresh
        with open(self.log, "ab") as log:  # a restart under the same name appends to the same log
            self.popen = subprocess.Popen([sys.executable, "-m", module, *args, *port_args],
                                          stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                          start_new_session=True)

    def wait_port(self, deadline: float) -> int:
        """Wait for the process to report its bound port (it does so once it is ready)."""
        while time.monotonic() < deadline:
            if self.port_file.exists():
                self.port = int(self.port_file.read_text())
                return self.port
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.popen.returncode} during start-up:\n"
                                   f"{_tail(self.log)}")
            time.sleep(0.02)
        raise TimeoutError(f"{self.name} did not become ready in time:\n{_tail(self.log)}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


class LocalCluster:
    """``with ps.LocalCluster(servers=2) as cluster: ps.Client(cluster.address)``.

    The scheduler keeps its state in ``workdir / "scheduler-state"``; ``restart_scheduler`` (or
    ``kill_scheduler`` then ``start_scheduler``) brings it back on the same port with that state.

    ``tls=True``: every process speaks mutual TLS, with certificates ``paramserver certs`` makes in
    ``workdir / "certs"``; ``auth=True``: every call needs a token. A user connects with
    ``ps.Client(cluster.address, tls=cluster.tls, token=cluster.token)``. ``users``: more users, name ->
    their quotas ("jobs=1 param_bytes=1MiB", or ""); ``cluster.tokens[name]`` is each one's token
    (and "user"'s, "admin"'s)."""

    def __init__(self, servers: int = 2, workers: int = 0, *, host: str = "127.0.0.1", start_timeout: float = 60.0,
                 server_args: list[str] | None = None, scheduler_args: list[str] | None = None,
                 worker_args: list[str] | None = None, tls: bool = False, auth: bool = False,
                 users: dict[str, str] | None = None):
        self.host = host
        self.workdir = Path(tempfile.mkdtemp(prefix="paramserver-"))
        self._secure(tls, auth, users or {})
        self.processes: list[Process] = []
        self.servers: list[Process] = []
        self.workers: list[Process] = []
        self.worker_args = worker_args or []
        self.scheduler_args = list(scheduler_args or [])
        self.state_dir = self.workdir / "scheduler-state"
        try:
            deadline = time.monotonic() + start_timeout
            self.scheduler = self._spawn("scheduler", ["scheduler", "--host", host, "--port", "0",
                                                       "--state-dir", str(self.state_dir), *self.scheduler_args])
            port = self.scheduler.wait_port(deadline)
            self.address = f"{host}:{port}"
            for i in range(servers):
                self.add_server(deadline, server_args)
            self.wait_servers(servers, deadline)
            for i in range(workers):
                self.add_worker()
            self.wait_workers(workers, deadline)
        except BaseException:
            self.close()
            raise

    def _secure(self, tls: bool, auth: bool, users: dict[str, str]) -> None:
        """Certificates and tokens for ``tls``/``auth``; the members' settings go to every process's
        environment; ``tls`` and ``token`` are a user's."""
        from ps import security
        self.env: dict[str, str] = {}
        self.tls: security.TLS | None = None
        self.token: str | None = None
        self.certs: Path | None = None
        self.tokens: dict[str, str] = {}
        self.member = security.Security()
        if not (tls or auth):
            return
        from ps import certs
        self.certs = self.workdir / "certs"
        certs.make(self.certs, [self.host])
        node = security.TLS.from_dir(self.certs, "node")
        if tls:
            self.tls = security.TLS.from_dir(self.certs, "user")
            self.env.update(node.env())
        if auth:
            import secrets
            self.tokens = {role: security.read_token(str(self.certs / f"{role}.token")) for role in ("user", "admin")}
            with open(self.certs / "tokens", "a") as f:
                for name, quotas in users.items():
                    self.tokens[name] = secrets.token_urlsafe(32)
                    f.write(f"user {self.tokens[name]} {name} {quotas}\n")
            self.token = self.tokens["user"]
            self.env.update(PS_TOKEN_FILE=str(self.certs / "member.token"), PS_AUTH_FILE=str(self.certs / "tokens"))
        self.member = security.Security(tls=node if tls else None,
                                        token=security.read_token(str(self.certs / "member.token")) if auth else None)

    def client(self, **kwargs):
        """A ps.Client of this cluster, as its user (its TLS and token, or none)."""
        from ps.client import Client
        return Client(self.address, tls=self.tls or False, token=self.token or "", **kwargs)

    def kill_scheduler(self) -> None:
        """kill -9 the scheduler (it gets no chance to write anything more)."""
        self.scheduler.kill()

    def start_scheduler(self, timeout: float = 60.0, state_dir: str | os.PathLike | None = None) -> Process:
        """Start the scheduler again on its port (after ``kill_scheduler``, or a stop), on its state dir
        (or ``state_dir``); returns once it listens."""
        if self.scheduler.popen.poll() is None:
            raise RuntimeError(f"the scheduler at {self.address} is still running: kill_scheduler() first")
        port = self.address.rsplit(":", 1)[1]
        old = self.scheduler
        self.scheduler = Process("scheduler", ["scheduler", "--host", self.host, "--port", port, "--state-dir",
                                               str(state_dir or self.state_dir), *self.scheduler_args], self.workdir,
                                 self.env)
        self.processes[self.processes.index(old)] = self.scheduler
        self.scheduler.wait_port(time.monotonic() + timeout)
        return self.scheduler

    def restart_scheduler(self, timeout: float = 60.0) -> Process:
        """kill -9 the scheduler and start it again on the same port and state."""
        self.kill_scheduler()
        return self.start_scheduler(timeout)

    def _spawn(self, name: str, args: list[str], env: dict | None = None, listens: bool = True) -> Process:
        p = Process(name, args, self.workdir, {**self.env, **(env or {})}, listens=listens)
        self.processes.append(p)
        return p

    def add_server(self, deadline: float | None = None, extra: list[str] | None = None) -> Process:
        p = self._spawn(f"server-{len(self.servers)}",
                        ["server", "--scheduler", self.address, "--host", self.host, "--port", "0", *(extra or [])])
        self.servers.append(p)
        p.wait_port(deadline or time.monotonic() + 60)
        return p

    def add_worker(self, extra: list[str] | None = None) -> Process:
        """Start one more worker (one BLAS thread each, so workers scale across cores)."""
        p = self._spawn(f"worker-{len(self.workers)}", ["worker", "--scheduler", self.address,
                                                         *self.worker_args, *(extra or [])],
                        env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                        listens=False)
        self.workers.append(p)
        return p

    def _wait_view(self, count, n: int, what: str, deadline: float) -> None:
        ch = rpc.channel(self.address, security=self.member)
        try:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            while True:
                have = count(stub.GetCluster(scheduler_pb2.GetClusterRequest(), timeout=5))
                if have >= n:
                    return
                for p in self.processes:
                    if p.popen.poll() is not None:
                        raise RuntimeError(f"{p.name} exited with code {p.popen.returncode}:\n{_tail(p.log)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {have} of {n} {what} registered with the scheduler at {self.address}")
                time.sleep(0.02)
        finally:
            ch.close()

    def wait_servers(self, n: int, deadline: float) -> None:
        """Wait until the scheduler sees n servers up."""
        self._wait_view(lambda v: sum(s.state == "up" for s in v.servers), n, "servers", deadline)

    def wait_workers(self, n: int, deadline: float) -> None:
        """Wait until the scheduler knows n workers."""
        self._wait_view(lambda v: len(v.workers), n, "workers", deadline)

    def logs(self) -> dict[str, str]:
        return {p.name: _tail(p.log, 1000) for p in self.processes}

    def close(self) -> None:
        for p in reversed(self.processes):
            p.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
