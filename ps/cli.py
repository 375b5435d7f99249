"""The `paramserver` command. Every option can also come from the environment variable
shown in its --help (PS_SCHEDULER, PS_PORT, PS_HOST, PS_ADVERTISE, ...)."""

from __future__ import annotations

import json
import logging
import sys

import click

from ps import rpc


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def parse_bytes(text: str) -> int:
    """'64MiB', '4MB', '1GiB', '1024' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if not num or unit not in units:
        raise click.BadParameter(f"'{text}' is not a size: use e.g. 64MiB, 4MB or 1048576")
    return int(float(num) * units[unit])


class Bytes(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        return value if isinstance(value, int) else parse_bytes(value)


def emit_json(obj: dict) -> None:
    """The last line of a --json command: one JSON object."""
    click.echo(json.dumps(obj, sort_keys=True))


log_level = click.option("--log-level", default="info", envvar="PS_LOG_LEVEL", show_default=True,
                         type=click.Choice(["debug", "info", "warning", "error"]), help="Log verbosity.")
port_file = click.option("--port-file", default=None, hidden=True,
                         help="Write the bound port here once ready (used by LocalCluster).")
host_opt = click.option("--host", default="0.0.0.0", envvar="PS_HOST", show_default=True,
                        help="Interface to listen on [env PS_HOST].")
max_msg = click.option("--max-message-bytes", type=Bytes(), default=rpc.DEFAULT_MAX_MESSAGE_BYTES,
                       envvar="PS_MAX_MESSAGE_BYTES", show_default=True,
                       help="gRPC message size limit [env PS_MAX_MESSAGE_BYTES].")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="paramserver")
def main() -> None:
    """paramserver: sharded parameter servers with server-side optimizers, over gRPC."""


@main.command()
@host_opt
@click.option("--port", default=7070, envvar="PS_PORT", show_default=True, help="Port [env PS_PORT]; 0 picks one.")
@click.option("--heartbeat-interval", default=1.0, envvar="PS_HEARTBEAT_INTERVAL", show_default=True,
              help="Seconds between server heartbeats [env PS_HEARTBEAT_INTERVAL].")
@click.option("--server-timeout", default=5.0, envvar="PS_SERVER_TIMEOUT", show_default=True,
              help="A server silent this long is marked down [env PS_SERVER_TIMEOUT].")
@click.option("--threads", default=32, envvar="PS_THREADS", show_default=True, help="RPC threads [env PS_THREADS].")
@max_msg
@port_file
@log_level
def scheduler(host, port, heartbeat_interval, server_timeout, threads, max_message_bytes, port_file, log_level):
    """Run the scheduler: membership, shard maps."""
    _setup_logging(log_level)
    from ps.scheduler.service import run
    run(host=host, port=port, threads=threads, heartbeat_interval=heartbeat_interval,
        server_timeout=server_timeout, port_file=port_file, max_message_bytes=max_message_bytes)


@main.command()
@click.option("--scheduler", "scheduler_addr", required=True, envvar="PS_SCHEDULER",
              help="Scheduler HOST:PORT [env PS_SCHEDULER].")
@host_opt
@click.option("--port", default=7000, envvar="PS_PORT", show_default=True, help="Port [env PS_PORT]; 0 picks one.")
@click.option("--advertise", default=None, envvar="PS_ADVERTISE",
              help="HOST:PORT other processes use to reach this server [env PS_ADVERTISE]; "
                   "default: the listening host (127.0.0.1 when listening on 0.0.0.0) and port.")
@click.option("--threads", default=32, envvar="PS_THREADS", show_default=True, help="RPC threads [env PS_THREADS].")
@click.option("--max-bytes", type=Bytes(), default=None, envvar="PS_MAX_BYTES",
              help="Refuse models beyond this many bytes of parameters + optimizer state [env PS_MAX_BYTES].")
@click.option("--connect-timeout", default=60.0, envvar="PS_CONNECT_TIMEOUT", show_default=True,
              help="Give up (exit 2) if the scheduler cannot be reached for this long [env PS_CONNECT_TIMEOUT].")
@max_msg
@port_file
@log_level
def server(scheduler_addr, host, port, advertise, threads, max_bytes, connect_timeout, max_message_bytes,
           port_file, log_level):
    """Run a parameter-server shard."""
    _setup_logging(log_level)
    from ps.server.service import run
    run(scheduler_addr, host=host, port=port, advertise=advertise, threads=threads,
        max_message_bytes=max_message_bytes, max_bytes=max_bytes, port_file=port_file,
        connect_timeout=connect_timeout)


@main.command()
@click.option("--servers", default=2, show_default=True, help="Parameter-server shards.")
@click.option("--host", default="127.0.0.1", show_default=True)
@log_level
def local(servers, host, log_level):
    """Start a scheduler and N servers on this machine until Ctrl-C."""
    _setup_logging(log_level)
    import signal
    import threading

    from ps.local import LocalCluster
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    with LocalCluster(servers=servers, host=host) as cluster:
        click.echo(f"scheduler at {cluster.address} with {servers} servers; logs in {cluster.workdir}")
        click.echo(f"  python -c \"import ps; print(ps.Client('{cluster.address}').cluster())\"")
        click.echo("Ctrl-C to stop.")
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    click.echo("stopped.")


@main.command()
@click.argument("address")
@click.option("--service", default="", help="Service name to check ('' = the whole process).")
@click.option("--timeout", default=5.0, show_default=True)
def health(address, service, timeout):
    """Exit 0 when ADDRESS reports SERVING (grpc.health.v1)."""
    from ps.errors import PSError
    try:
        status = rpc.check_health(address, service, timeout)
    except PSError as e:
        click.echo(str(e), err=True)
        sys.exit(1)
    click.echo(status)
    sys.exit(0 if status == "SERVING" else 1)


@main.command()
@click.argument("address", envvar="PS_SCHEDULER")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(address, as_json):
    """A table of the servers the scheduler at ADDRESS knows, their models and bytes held."""
    from google.protobuf.json_format import MessageToDict

    from ps.client import Client
    from ps.errors import PSError
    try:
        with Client(address, connect_timeout=5) as client:
            view = client.cluster()
    except PSError as e:
        click.echo(str(e), err=True)
        sys.exit(1)
    if as_json:
        emit_json(MessageToDict(view, preserving_proto_field_name=True))
        return
    rows = [("SERVER", "ADDRESS", "STATE", "LAST SEEN", "BYTES", "MODELS")]
    for s in view.servers:
        rows.append((s.server_id, s.address, s.state, f"{s.last_heartbeat_age_s:.1f}s ago", _human(s.bytes),
                     ",".join(s.models) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    click.echo(f"{sum(s.state == 'up' for s in view.servers)} of {len(view.servers)} servers up; "
               f"models: {', '.join(view.models) or '-'}")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@main.group()
def bench() -> None:
    """Benchmarks; each prints figures, and with --json one JSON object as its last line."""


@bench.command("pushpull")
@click.option("--size", type=Bytes(), default="64MiB", show_default=True, help="Model size (float32).")
@click.option("--servers", default=2, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True)
@click.option("--seconds", default=5.0, show_default=True, help="Time spent on each measurement.")
@click.option("--json", "as_json", is_flag=True)
def bench_pushpull(size, servers, optimizer, seconds, as_json):
    """push_pull throughput against a raw grpcio echo ceiling, and the optimizer's update rate."""
    from ps.bench import pushpull
    result = pushpull(size, servers, optimizer, seconds, echo=click.echo)
    if as_json:
        emit_json(result)
