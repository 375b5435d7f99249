"""The `paramserver` command. Every option can also come from the environment variable
shown in its --help (PS_SCHEDULER, PS_PORT, PS_HOST, PS_ADVERTISE, ...)."""

from __future__ import annotations

import json
import logging
import sys

import click

from ps import rpc
from ps.scheduler.jobs import Retention


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def parse_bytes(text: str) -> int:
    """'64MiB', '4MB', '1GiB', '1024' -> bytes."""
    from ps.limits import parse_size
    try:
        return parse_size(text)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


class Bytes(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        return value if isinstance(value, int) else parse_bytes(value)


def emit_json(obj: dict) -> None:
    """The last line of a --json command: one JSON object."""
    click.echo(json.dumps(obj, sort_keys=True))


log_level = click.option("--log-level", default="info", envvar="PS_LOG_LEVEL", show_default=True,
                         type=click.Choice(["debug", "info", "warning", "error"]), help="Log verbosity [env PS_LOG_LEVEL].")
port_file = click.option("--port-file", default=None, hidden=True,
                         help="Write the bound port here once ready (used by LocalCluster).")
host_opt = click.option("--host", default="0.0.0.0", envvar="PS_HOST", show_default=True,
                        help="Interface to listen on [env PS_HOST].")
max_msg = click.option("--max-message-bytes", type=Bytes(), default=rpc.DEFAULT_MAX_MESSAGE_BYTES,
                       envvar="PS_MAX_MESSAGE_BYTES", show_default=True,
                       help="gRPC message size limit [env PS_MAX_MESSAGE_BYTES].")


def limit_options(role: str, skip: tuple[str, ...] = ()):
    """The flags of every ps.limits.Limits setting that ``role`` takes (each also read from its PS_*
    variable); the command runs with ps.limits configured from them (``skip``: fields the command
    declares itself)."""
    import dataclasses
    import functools

    from ps import limits as ps_limits

    fields = [f for f in dataclasses.fields(ps_limits.Limits)
              if role in f.metadata.get("roles", ()) and f.name not in skip]

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            given = {f.name: kwargs.pop(f.name) for f in fields}
            ps_limits.configure(ps_limits.Limits.from_env(
                **given, max_message_bytes=kwargs.get("max_message_bytes")))
            return fn(*args, **kwargs)
        for f in reversed(fields):
            size = f.metadata["size"]
            default = None if f.default is dataclasses.MISSING else f.default
            shown = f.metadata["shown"] if default is None else default
            if size and default:
                shown = next((f"{default >> s}{u}" for s, u in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB"))
                              if default % (1 << s) == 0), default)
            wrapper = click.option(f.metadata["flag"], f.name, type=Bytes() if size else click.IntRange(min=0),
                                   default=None, envvar=f.metadata["env"], show_default=str(shown),
                                   help=f"{f.metadata['help']} [env {f.metadata['env']}]")(wrapper)
        return wrapper
    return decorate


def security_options(listens: bool = False):
    """--tls-cert/--tls-key/--tls-ca and --token-file (each also from its PS_* variable), plus
    --auth-file for a process that listens; the command runs with ps.security configured from them,
    and a setting that cannot work (a missing file, an expired certificate) exits 2 naming it."""
    import functools

    flags = [("tls_cert", "--tls-cert", "PS_TLS_CERT", "This process's TLS certificate (PEM); with --tls-key."),
             ("tls_key", "--tls-key", "PS_TLS_KEY", "The key of --tls-cert (PEM)."),
             ("tls_ca", "--tls-ca", "PS_TLS_CA", "Verify peers' certificates against this CA (PEM); on a listening "
                                                 "process, callers must then present one (mutual TLS)."),
             ("token_file", "--token-file", "PS_TOKEN_FILE", "Send the bearer token in this file on every call.")]
    if listens:
        flags.append(("auth_file", "--auth-file", "PS_AUTH_FILE",
                      "Accept only callers with a token listed here (lines ROLE TOKEN [NAME] [quota=N ...]; "
                      "roles member, user, admin); without it, anyone who reaches the port."))

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            from ps import security
            given = {name: kwargs.pop(name) for name, *_ in flags}
            try:
                security.configure(security.Security.from_settings(**given))
            except security.SecurityError as e:
                click.echo(f"{fn.__name__}: {e}", err=True)
                sys.exit(2)
            return fn(*args, **kwargs)
        for name, flag, env, text in reversed(flags):
            wrapper = click.option(flag, name, default=None, envvar=env, metavar="FILE",
                                   help=f"{text} [env {env}]")(wrapper)
        return wrapper
    return decorate


def data_options(fn):
    """--data-root (repeatable) and --data-protocols: where this process lets jobs read data from; the
    command gets them as ``data_policy`` (a ps.data_policy.DataPolicy)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, data_roots, data_protocols, **kwargs):
        from ps.data_policy import DataPolicy
        try:
            policy = DataPolicy.from_values(list(data_roots) or None, data_protocols)
        except ValueError as e:
            click.echo(f"{fn.__name__}: {e}", err=True)
            sys.exit(2)
        return fn(*args, data_policy=policy, **kwargs)
    wrapper = click.option("--data-protocols", "data_protocols", default=None, envvar="PS_DATA_PROTOCOLS",
                           metavar="LIST", help="fsspec protocols jobs may read data from besides local files under "
                                                "--data-root (comma-separated, e.g. s3,gs) [env PS_DATA_PROTOCOLS]."
                           )(wrapper)
    return click.option("--data-root", "data_roots", multiple=True, envvar="PS_DATA_ROOTS", metavar="PATH",
                        help="Jobs read data only under this directory or URL prefix (repeatable; env: "
                             "comma-separated); builtin: and synthetic: data always. With none and no "
                             "--data-protocols, anywhere. When set, checkpoints go only under the "
                             "checkpoint dir [env PS_DATA_ROOTS].")(wrapper)


#: commands that move large messages for a long time: they run with huge-page malloc
_HEAVY = {"scheduler", "server", "worker", "local", "demo", "bench", "submit"}


class _Main(click.Group):
    """Any command's ps.errors.PSError not handled where it happened (a refused token, a scheduler that
    went away) ends the command with its message and exit status 1, not a traceback."""

    def invoke(self, ctx):
        from ps.errors import PSError
        try:
            return super().invoke(ctx)
        except PSError as e:
            click.echo(f"{ctx.invoked_subcommand or 'paramserver'}: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="paramserver")
@click.pass_context
def main(ctx: click.Context) -> None:
    """paramserver: sharded parameter servers with server-side optimizers, over gRPC."""
    # Only when run as a program (not called in-process, e.g. by click's test runner).
    if (ctx.invoked_subcommand in _HEAVY and sys.argv[1:2] == [ctx.invoked_subcommand]
            and "--help" not in sys.argv and "-h" not in sys.argv):
        rpc.reexec_with_hugepage_malloc(sys.argv[1:])


@main.command()
@host_opt
@click.option("--port", default=7070, envvar="PS_PORT", show_default=True, help="Port [env PS_PORT]; 0 picks one.")
@click.option("--heartbeat-interval", default=1.0, envvar="PS_HEARTBEAT_INTERVAL", show_default=True,
              help="Seconds between server heartbeats [env PS_HEARTBEAT_INTERVAL].")
@click.option("--server-timeout", default=5.0, envvar="PS_SERVER_TIMEOUT", show_default=True,
              help="A server silent this long is marked down [env PS_SERVER_TIMEOUT].")
@click.option("--threads", default=8, envvar="PS_THREADS", show_default=True,
              help="Threads for short calls; followers and long polls take none [env PS_THREADS].")
@click.option("--keep-jobs", default=Retention.keep_jobs, envvar="PS_KEEP_JOBS", show_default=True,
              help="Ended jobs kept, newest first [env PS_KEEP_JOBS].")
@click.option("--keep-jobs-for", default=Retention.keep_jobs_s, envvar="PS_KEEP_JOBS_FOR", show_default=True,
              help="Seconds an ended job is kept [env PS_KEEP_JOBS_FOR].")
@click.option("--keep-params-for", default=Retention.params_s, envvar="PS_KEEP_PARAMS_FOR", show_default=True,
              help="Seconds a succeeded job's parameters stay on the servers, unless its spec sets keep_params "
                   "[env PS_KEEP_PARAMS_FOR].")
@click.option("--max-job-events", default=Retention.events, envvar="PS_MAX_JOB_EVENTS", show_default=True,
              help="Events kept per job [env PS_MAX_JOB_EVENTS].")
@click.option("--max-followers", default=Retention.followers, envvar="PS_MAX_FOLLOWERS", show_default=True,
              help="WatchJob streams open at once [env PS_MAX_FOLLOWERS].")
@click.option("--state-dir", default=None, envvar="PS_STATE_DIR", type=click.Path(file_okay=False),
              show_default="~/.local/state/paramserver/scheduler (the user's state dir)",
              help="Keep jobs, tasks, leases, members, shard maps and id counters here (SQLite), so a "
                   "restarted scheduler resumes them; one scheduler per dir [env PS_STATE_DIR].")
@click.option("--checkpoint-dir", default="", envvar="PS_CHECKPOINT_DIR",
              show_default="STATE_DIR/checkpoints",
              help="Where jobs' checkpoints go unless their spec names a checkpoint_dir: a directory every "
                   "server can write to, or any fsspec URL [env PS_CHECKPOINT_DIR].")
@click.option("--quota-param-bytes", type=Bytes(), default=0, envvar="PS_QUOTA_PARAM_BYTES", show_default="no limit",
              help="Each user's models together hold at most this many bytes of parameters (an auth-file line's "
                   "param_bytes=N overrides it) [env PS_QUOTA_PARAM_BYTES].")
@click.option("--quota-jobs", default=0, type=click.IntRange(min=0), envvar="PS_QUOTA_JOBS", show_default="no limit",
              help="Jobs each user may have queued or running at once (jobs=N per user) [env PS_QUOTA_JOBS].")
@click.option("--quota-tasks-per-job", default=0, type=click.IntRange(min=0), envvar="PS_QUOTA_TASKS_PER_JOB",
              show_default="no limit", help="Tasks one job may take, epochs x (shards + workers), the workers "
                                            "bounding its evaluation parts (tasks_per_job=N per user) "
                                            "[env PS_QUOTA_TASKS_PER_JOB].")
@data_options
@max_msg
@port_file
@log_level
@limit_options("scheduler")
@security_options(listens=True)
def scheduler(host, port, heartbeat_interval, server_timeout, threads, keep_jobs, keep_jobs_for, keep_params_for,
              max_job_events, max_followers, state_dir, checkpoint_dir, quota_param_bytes, quota_jobs,
              quota_tasks_per_job, data_policy, max_message_bytes, port_file, log_level):
    """Run the scheduler: membership, shard maps, jobs and task leases."""
    _setup_logging(log_level)
    from ps.scheduler.access import Quotas
    from ps.scheduler.service import run
    from ps.scheduler.state import StateError, default_dir
    retention = Retention(keep_jobs=keep_jobs, keep_jobs_s=keep_jobs_for, params_s=keep_params_for,
                          events=max_job_events, followers=max_followers)
    try:
        run(host=host, port=port, threads=threads, heartbeat_interval=heartbeat_interval,
            server_timeout=server_timeout, port_file=port_file, max_message_bytes=max_message_bytes,
            retention=retention, state_dir=state_dir or str(default_dir()), checkpoint_dir=checkpoint_dir,
            quotas=Quotas(quota_param_bytes, quota_jobs, quota_tasks_per_job), data_policy=data_policy)
    except StateError as e:
        click.echo(f"scheduler: {e}", err=True)
        sys.exit(2)


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
              show_default="half the memory this process may use (physical, cgroup or RLIMIT_AS, whichever is least)",
              help="Refuse models beyond this many bytes of parameters + optimizer state, all models "
                   "together [env PS_MAX_BYTES].")
@click.option("--connect-timeout", default=60.0, envvar="PS_CONNECT_TIMEOUT", show_default=True,
              help="Give up (exit 2) if the scheduler cannot be reached for this long [env PS_CONNECT_TIMEOUT].")
@click.option("--flow-window", type=Bytes(), default=rpc.DEFAULT_FLOW_WINDOW, envvar="PS_FLOW_WINDOW",
              show_default=f"{rpc.DEFAULT_FLOW_WINDOW >> 20}MiB",
              help="Fixed HTTP/2 stream window: bounds what grpc buffers for a client that streams "
                   "ahead without waiting (Assign, Push, raw clients; ps.Client's push_pull keeps "
                   f"{rpc.DEFAULT_FLOW_WINDOW >> 20} MiB in flight by itself); 0: grpc's adaptive window, for links whose "
                   "bandwidth x delay exceeds it [env PS_FLOW_WINDOW].")
@data_options
@max_msg
@port_file
@log_level
@limit_options("server", skip=("max_bytes",))
@security_options(listens=True)
def server(scheduler_addr, host, port, advertise, threads, max_bytes, connect_timeout, flow_window, data_policy,
           max_message_bytes, port_file, log_level):
    """Run a parameter-server shard."""
    _setup_logging(log_level)
    from ps.server.service import run
    run(scheduler_addr, host=host, port=port, advertise=advertise, threads=threads,
        max_message_bytes=max_message_bytes, max_bytes=max_bytes, port_file=port_file,
        connect_timeout=connect_timeout, flow_window=flow_window, data_policy=data_policy)


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
@security_options()
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
@security_options()
def status(address, as_json):
    """A table of the servers the scheduler at ADDRESS knows, their models and bytes held."""
    from google.protobuf.json_format import MessageToDict

    from ps.client import Client
    from ps.errors import PSError
    try:
        with Client(address, connect_timeout=5) as client:
            view = client.cluster()
            tables = _table_totals(client, [s.address for s in view.servers if s.state == "up"])
    except PSError as e:
        click.echo(str(e), err=True)
        sys.exit(1)
    if as_json:
        emit_json({**MessageToDict(view, preserving_proto_field_name=True),
                   "tables": [{"model": m, "table": t, "rows": r, "bytes": b} for (m, t), (r, b) in tables.items()]})
        return
    rows = [("SERVER", "ADDRESS", "STATE", "LAST SEEN", "BYTES", "MODELS")]
    for s in view.servers:
        rows.append((s.server_id, s.address, s.state, f"{s.last_heartbeat_age_s:.1f}s ago", _human(s.bytes),
                     ",".join(s.models) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    click.echo(f"{sum(s.state == 'up' for s in view.servers)} of {len(view.servers)} servers up; "
               f"{len(view.workers)} workers; models: {', '.join(view.models) or '-'}; "
               f"scheduler incarnation {view.incarnation} (cluster {view.cluster_id[:8] or '-'})")
    for (model, table), (rows, nbytes) in tables.items():
        click.echo(f"sparse table {model}/{table}: {rows} rows, {_human(nbytes)}")
    for u in view.under_replicated:
        click.echo(f"under-replicated: {u.model} shard {u.shard}: {len(u.servers)} of {u.wanted} replicas "
                   f"({', '.join(u.servers) or 'none left'})")


def _table_totals(client, addresses) -> dict:
    """(model, table) -> [rows, bytes] summed over the servers at ``addresses`` (one unreachable: left out)."""
    from ps.errors import PSError
    totals: dict = {}
    for address in addresses:
        try:
            models = client.stats(address).models
        except PSError:
            continue
        for m in models:
            for t in m.tables:
                entry = totals.setdefault((m.model, t.name), [0, 0])
                entry[0] += t.rows
                entry[1] += t.bytes
    return dict(sorted(totals.items()))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--hosts", required=True, help="Comma-separated host names and IPs the member certificate is valid for "
                                             "(localhost and 127.0.0.1 are always added); '*.name' wildcards allowed.")
@click.option("--days", default=365, show_default=True, type=click.IntRange(min=1), help="Validity.")
@click.option("--overwrite", is_flag=True, help="Replace an existing CA in DIRECTORY.")
def certs(directory, hosts, days, overwrite):
    """Make a CA, a member certificate (scheduler, servers, workers), a user certificate and a token
    per role (member.token, user.token, admin.token, and the `tokens` file for --auth-file) in
    DIRECTORY, for a test or small cluster."""
    from ps import certs as ps_certs
    try:
        ps_certs.make(directory, [h.strip() for h in hosts.split(",") if h.strip()], days, overwrite=overwrite)
    except (FileExistsError, ValueError) as e:
        click.echo(f"certs: {e}", err=True)
        sys.exit(2)
    click.echo(ps_certs.describe(directory))


@main.group()
def bench() -> None:
    """Benchmarks; each prints figures, and with --json one JSON object as its last line."""


@bench.command("pushpull")
@click.option("--size", type=Bytes(), default="64MiB", show_default=True, help="Model size (float32).")
@click.option("--servers", default=2, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True)
@click.option("--seconds", default=5.0, show_default=True, help="Time spent on each measurement.")
@click.option("--replicas", default=1, show_default=True,
              help="Servers holding each slice; above 1, the same model with one replica is measured beside it.")
@click.option("--tls", is_flag=True, help="Also measure a cluster with mutual TLS and tokens, in the same rounds.")
@click.option("--peer", type=click.Choice(["torch-rpc"]), default=None,
              help="Also measure a torch.distributed.rpc parameter server (needs torch), in the same rounds.")
@click.option("--clients", default=1, show_default=True, help="clients push_pulling at once (ours and the peer)")
@click.option("--inflight", default=0, show_default=True,
              help="chunks streamed ahead per shard, servers' stream window to match (0: the defaults)")
@click.option("--json", "as_json", is_flag=True)
def bench_pushpull(size, servers, optimizer, seconds, replicas, tls, peer, clients, inflight, as_json):
    """push_pull throughput against a raw grpcio echo ceiling, and the optimizer's update rate."""
    from ps.bench import pushpull
    try:
        result = pushpull(size, servers, optimizer, seconds, echo=click.echo, replicas=replicas, tls=tls,
                          peer=peer or "", clients=clients, inflight=inflight)
    except ImportError as e:
        click.echo(f"bench pushpull --peer {peer}: {e}: pip install torch (CPU is enough)", err=True)
        sys.exit(2)
    if as_json:
        emit_json(result)


@bench.command("failover")
@click.option("--json", "as_json", is_flag=True)
def bench_failover(as_json):
    """What a kill -9 of a server and of the scheduler costs: detection, stall, updates lost."""
    from ps.bench_failover import failover
    result = failover(echo=click.echo)
    if as_json:
        emit_json(result)


@bench.command("train")
@click.option("--epochs", default=6, show_default=True)
@click.option("--consistency", multiple=True, type=click.Choice(["asp", "ssp", "bsp"]),
              help="run 2 workers under this consistency model (repeatable; default: asp)")
@click.option("--staleness", default=3, show_default=True, help="ssp's bound, in clocks")
@click.option("--batch", default=0, show_default=True,
              help="each of the 2 workers' batch (0: 2048 under asp and ssp, 1024 under bsp: 2048 a step)")
@click.option("--replicas", default=0, type=click.IntRange(0, 2), show_default="2: the default",
              help="servers holding each slice of the jobs' parameters (1: no copy, as a plain loop keeps)")
@click.option("--eval-every", default=1, type=click.IntRange(1), show_default=True,
              help="the jobs evaluate after every this many epochs and the last (the epochs: only at the end, "
                   "as the PyTorch loop's training figure)")
@click.option("--json", "as_json", is_flag=True)
def bench_train(epochs, consistency, staleness, batch, replicas, eval_every, as_json):
    """samples/s of 1 and 2 workers through the cluster against a single-process NumPy loop."""
    from ps.bench import train
    result = train(epochs, echo=click.echo, consistency=consistency or ("asp",), staleness=staleness, batch=batch,
                   replicas=replicas, eval_every=eval_every)
    if as_json:
        emit_json(result)


@bench.command("latency")
@click.option("--size", type=Bytes(), default="1KiB", show_default=True, help="push_pull payload (float32)")
@click.option("--seconds", default=6.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_latency(size, seconds, as_json):
    """Round trip of a small push_pull against a raw grpcio unary echo (p50 / p99, microseconds)."""
    from ps.bench_latency import latency
    result = latency(size, seconds, echo=click.echo)
    if as_json:
        emit_json(result)


@bench.command("codec")
@click.option("--chunk", "chunk_bytes", type=Bytes(), default=rpc.DEFAULT_CHUNK_BYTES,
              show_default=f"{rpc.DEFAULT_CHUNK_BYTES >> 20}MiB", help="Chunk size (float32).")
@click.option("--iterations", default=200, show_default=True, help="Interleaved rounds (medians are reported).")
@click.option("--json", "as_json", is_flag=True)
def bench_codec(chunk_bytes, iterations, as_json):
    """The hand-written wire codec against the generated protobuf classes, per hot-path step."""
    from ps.bench import codec
    result = codec(chunk_bytes, iterations, echo=click.echo)
    if as_json:
        emit_json(result)


@bench.command("scheduler")
@click.option("--members", default=1000, show_default=True, help="Simulated workers (heartbeat every second).")
@click.option("--followers", default=200, show_default=True, help="WatchJob streams on a running job.")
@click.option("--seconds", default=10.0, show_default=True, help="Measured time, after every member registered.")
@click.option("--task-seconds", default=5.0, show_default=True, help="How long a simulated task holds its lease.")
@click.option("--json", "as_json", is_flag=True)
def bench_scheduler(members, followers, seconds, task_seconds, as_json):
    """Heartbeat and lease latency of a real scheduler under N simulated members and F followers."""
    from ps.bench_scheduler import scheduler
    result = scheduler(members, followers, seconds, task_seconds, echo=click.echo)
    if as_json:
        emit_json(result)


@bench.command("rows")
@click.option("--width", "widths", type=click.IntRange(min=1), multiple=True, default=(16, 64), show_default=True,
              help="Sparse table row width (float32); repeat for several tables.")
@click.option("--batch", "batches", type=click.IntRange(min=1), multiple=True, default=(1_000, 10_000, 100_000),
              show_default=True, help="Ids per pull_rows + push_rows; repeat for several batch sizes.")
@click.option("--servers", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--seconds", default=1.5, show_default=True, type=click.FloatRange(min=0),
              help="Time spent on each measurement (ours and raw grpcio, per case).")
@click.option("--json", "as_json", is_flag=True)
def bench_rows(widths, batches, servers, seconds, as_json):
    """Sparse-table rows/s of pull_rows + push_rows per width and batch against raw grpcio moving the same bytes."""
    from ps.bench_rows import rows
    rows(widths, batches, servers, seconds, as_json=as_json, echo=click.echo)


@main.command()
@click.option("--scheduler", "scheduler_addr", required=True, envvar="PS_SCHEDULER",
              help="Scheduler HOST:PORT [env PS_SCHEDULER].")
@click.option("--device", default="cpu", envvar="PS_DEVICE", show_default=True,
              help="cpu, or gpu:N for CuPy on GPU N [env PS_DEVICE].")
@click.option("--name", default=None, envvar="PS_WORKER_NAME", help="Name in logs [env PS_WORKER_NAME]; "
              "default host:pid.")
@click.option("--connect-timeout", default=60.0, envvar="PS_CONNECT_TIMEOUT", show_default=True,
              help="Give up if the scheduler cannot be reached for this long [env PS_CONNECT_TIMEOUT].")
@click.option("--health-port", default=0, envvar="PS_HEALTH_PORT", show_default=True,
              help="Serve grpc.health.v1 on this port for probes (SERVING while the scheduler answers); "
                   "0: none [env PS_HEALTH_PORT].")
@data_options
@log_level
@security_options(listens=True)
def worker(scheduler_addr, device, name, connect_timeout, health_port, data_policy, log_level):
    """Run a stateless training worker: lease tasks, compute gradients, push them."""
    _setup_logging(log_level)
    from ps.errors import PSError
    from ps.worker.data import set_policy
    from ps.worker.runner import run
    set_policy(data_policy)
    try:
        run(scheduler_addr, device=device, name=name, connect_timeout=connect_timeout, health_port=health_port)
    except (PSError, RuntimeError) as e:
        click.echo(f"worker: {e}", err=True)
        sys.exit(2)


reconnect_opt = click.option(
    "--reconnect-for", default=60.0, envvar="PS_RECONNECT_FOR", show_default=True, type=click.FloatRange(min=0),
    help="When the scheduler goes away while following (a restart resumes the job), keep reconnecting this "
         "many seconds before giving up [env PS_RECONNECT_FOR].")


def _follow(job, progress: bool, logdir: str | None, reconnect_s: float = 60.0):
    """Wait for a job; print its outcome; exit 1 if it did not succeed, 3 if the scheduler went away
    (and did not come back within ``reconnect_s``: a restarted scheduler resumes the job and the
    follow goes on)."""
    from ps.client import JobCancelled, JobFailed
    from ps.errors import PSError
    try:
        return job.wait(progress=progress, logdir=logdir, reconnect_s=reconnect_s)
    except (JobFailed, JobCancelled) as e:
        click.echo(str(e), err=True)
        sys.exit(1)
    except PSError as e:
        address = job.client.address
        click.echo(f"lost the scheduler at {address} while following {job.job_id} "
                   f"({type(e).__name__}: {str(e).split(': ')[-1]}); once it is back, "
                   f"`paramserver follow {job.job_id} --scheduler {address}` picks the job up again", err=True)
        sys.exit(3)


def _follow_to_end(job, logdir: str | None, save: str | None, as_json: bool, reconnect_s: float = 60.0) -> dict:
    """`submit --follow` / `follow`: progress to the end, save the model, say how it went; the
    figures for --json (exits as ``_follow`` does when the job did not succeed)."""
    model = _follow(job, progress=not as_json, logdir=logdir, reconnect_s=reconnect_s)
    if save:
        model.save(save)
    click.echo(f"{job.job_id} succeeded: test accuracy {model.metrics['test_accuracy']:.4f}", err=as_json)
    return {"job_id": job.job_id, **model.metrics, "state": "succeeded"}


def _client(address: str):
    from ps.client import Client
    from ps.errors import PSError
    try:
        return Client(address, connect_timeout=10)
    except PSError as e:
        click.echo(str(e), err=True)
        sys.exit(1)


@main.command()
@click.argument("spec_path", type=click.Path(dir_okay=False), required=False)
@click.option("--scheduler", "scheduler_addr", required=True, envvar="PS_SCHEDULER", help="[env PS_SCHEDULER]")
@click.option("--resume", "resume_from", default=None, metavar="CKPT",
              help="Continue from this checkpoint (a directory or fsspec URL with a manifest.json): parameters, "
                   "optimizer state and epochs done; SPEC_PATH is then optional (default: the checkpoint's spec).")
@click.option("--follow", is_flag=True, help="Show progress until the job ends.")
@click.option("--logdir", default=None, help="Write TensorBoard event files here (with --follow).")
@click.option("--save", default=None, help="Save the trained model to this directory (with --follow).")
@reconnect_opt
@click.option("--json", "as_json", is_flag=True)
@security_options()
def submit(spec_path, scheduler_addr, resume_from, follow, logdir, save, reconnect_for, as_json):
    """Submit the job in SPEC_PATH (JSON or TOML), or resume one from a checkpoint (--resume)."""
    from ps.errors import PSError
    from ps.spec import JobSpec, SpecError
    if spec_path is None and resume_from is None:
        raise click.UsageError("give SPEC_PATH, or --resume CKPT")
    try:
        spec = JobSpec.load(spec_path) if spec_path else None
    except SpecError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    with _client(scheduler_addr) as client:
        try:
            job = client.resume(resume_from, spec) if resume_from else client.submit(spec)
        except PSError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        click.echo(f"submitted {job.job_id}", err=as_json)
        result = {"job_id": job.job_id, "state": job.summary.state}
        if follow:
            result = _follow_to_end(job, logdir, save, as_json, reconnect_for)
        if as_json:
            emit_json(result)


@main.command()
@click.argument("job_id")
@click.option("--scheduler", "scheduler_addr", required=True, envvar="PS_SCHEDULER", help="[env PS_SCHEDULER]")
@click.option("--logdir", default=None, help="Write TensorBoard event files here.")
@click.option("--save", default=None, help="Save the trained model to this directory.")
@reconnect_opt
@click.option("--json", "as_json", is_flag=True)
@security_options()
def follow(job_id, scheduler_addr, logdir, save, reconnect_for, as_json):
    """Follow a submitted job to its end (progress bar), as `submit --follow` does."""
    from ps.errors import PSError
    with _client(scheduler_addr) as client:
        try:
            job = client.job(job_id)
        except PSError as e:
            click.echo(str(e), err=True)
            sys.exit(1)
        result = _follow_to_end(job, logdir, save, as_json, reconnect_for)
    if as_json:
        emit_json(result)


@main.command()
@click.option("--scheduler", "scheduler_addr", required=True, envvar="PS_SCHEDULER", help="[env PS_SCHEDULER]")
@click.option("--json", "as_json", is_flag=True)
@security_options()
def jobs(scheduler_addr, as_json):
    """List jobs and their state."""
    with _client(scheduler_addr) as client:
        infos = [j.summary for j in client.jobs()]
    if as_json:
        emit_json({"jobs": [{"job_id": i.job_id, "name": i.name, "state": i.state, "error": i.error,
                             "tasks_done": i.tasks_done, "tasks_total": i.tasks_total,
                             "epoch": i.metrics.epoch, "test_accuracy": i.metrics.test_accuracy}
                            for i in infos]})
        return
    click.echo(f"{'JOB':<10} {'NAME':<16} {'STATE':<10} {'TASKS':>9} {'EPOCH':>5} {'TEST ACC':>8}  ERROR")
    for i in infos:
        click.echo(f"{i.job_id:<10} {i.name[:16]:<16} {i.state:<10} {i.tasks_done:>4}/{i.tasks_total:<4} "
                   f"{i.metrics.epoch:>5} {i.metrics.test_accuracy:>8.4f}  {i.error}")


@main.command()
@click.argument("job_id")
@click.option("--scheduler", "scheduler_addr", required=True, envvar="PS_SCHEDULER", help="[env PS_SCHEDULER]")
@security_options()
def cancel(job_id, scheduler_addr):
    """Cancel a job; its parameters are freed on every server."""
    from ps.errors import PSError
    with _client(scheduler_addr) as client:
        try:
            client.job(job_id).cancel()
        except PSError as e:
            click.echo(str(e), err=True)
            sys.exit(1)
    click.echo(f"cancelled {job_id}")


@main.command()
@click.argument("job_id")
@click.option("--scheduler", "scheduler_addr", required=True, envvar="PS_SCHEDULER", help="[env PS_SCHEDULER]")
@click.option("--url", default="", help="Write it here (a directory or fsspec URL); default: under the job's "
                                        "checkpoint_dir / the scheduler's --checkpoint-dir.")
@click.option("--json", "as_json", is_flag=True)
@security_options()
def checkpoint(job_id, scheduler_addr, url, as_json):
    """Write a checkpoint of a job now: its parameters, optimizer state and progress."""
    from ps.errors import PSError
    with _client(scheduler_addr) as client:
        try:
            resp = client.job(job_id).checkpoint(url, full=True)
        except PSError as e:
            click.echo(str(e), err=True)
            sys.exit(1)
    click.echo(f"checkpoint of {job_id} after epoch {resp.epoch}: {resp.url} ({_human(resp.bytes)})",
               err=as_json)
    if as_json:
        emit_json({"job_id": job_id, "url": resp.url, "bytes": resp.bytes, "epoch": resp.epoch})


@main.command()
@click.argument("address")
@click.option("--scheduler", "scheduler_addr", required=True, envvar="PS_SCHEDULER", help="[env PS_SCHEDULER]")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for every slice to move.")
@click.option("--json", "as_json", is_flag=True)
@security_options()
def drain(address, scheduler_addr, timeout, as_json):
    """Move every slice off the server at ADDRESS (host:port), so it can stop without failing a job."""
    from ps.errors import PSError
    with _client(scheduler_addr) as client:
        try:
            resp = client.drain(address, timeout)
        except PSError as e:
            click.echo(str(e), err=True)
            sys.exit(1)
    click.echo(f"drained {address}: {resp.shards_moved} shard replicas of {len(resp.models)} models moved; "
               f"it holds nothing now and can stop", err=as_json)
    if as_json:
        emit_json({"address": address, "shards_moved": resp.shards_moved, "models": list(resp.models)})


@main.command()
@click.argument("job_id")
@click.option("--scheduler", "scheduler_addr", required=True, envvar="PS_SCHEDULER", help="[env PS_SCHEDULER]")
@security_options()
def delete(job_id, scheduler_addr):
    """Delete a job: cancel it if it runs, free its parameters on every server, forget its record."""
    from ps.errors import PSError
    with _client(scheduler_addr) as client:
        try:
            freed = client.delete_job(job_id)
        except PSError as e:
            click.echo(str(e), err=True)
            sys.exit(1)
    click.echo(f"deleted {job_id}" + ("" if freed else " (some servers could not be reached to free its "
                                                       "parameters)"))


@main.command()
@click.option("--model", "model_kind", type=click.Choice(["mlp", "cnn", "text"]), default="mlp", show_default=True,
              help="mlp / cnn: digits; text: hashed-word softmax regression on the bundled fortunes (10 topics)")
@click.option("--scheduler", "scheduler_addr", default=None, envvar="PS_SCHEDULER",
              help="Submit to this cluster instead of starting a local one [env PS_SCHEDULER].")
@click.option("--servers", default=2, show_default=True, help="Local cluster: server shards.")
@click.option("--workers", default=2, show_default=True, help="Local cluster: workers.")
@click.option("--device", default="cpu", show_default=True, help="Local cluster: the workers' device, cpu or gpu:N.")
@click.option("--epochs", default=None, type=int, help="Override the demo's epochs.")
@click.option("--seed", default=0, show_default=True)
@click.option("--lease-timeout", default=30.0, show_default=True, help="Seconds before a silent worker's task "
              "goes back to the queue.")
@click.option("--logdir", default=None, help="Write TensorBoard event files here.")
@click.option("--save", default=None, help="Save the trained model to this directory.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
@security_options()
def demo(model_kind, scheduler_addr, servers, workers, device, epochs, seed, lease_timeout, logdir, save, as_json):
    """Train on bundled data (8x8 digits, or fortunes texts for --model text; 7:3 split) and print the
    test accuracy."""
    import contextlib
    import time

    from ps.demo import demo_spec
    from ps.local import LocalCluster
    spec = demo_spec(model_kind, epochs=epochs, seed=seed, workers=workers, lease_timeout_s=lease_timeout)
    start = time.perf_counter()
    cluster = None
    with contextlib.ExitStack() as stack:
        if scheduler_addr is None:
            cluster = stack.enter_context(LocalCluster(servers=servers, workers=workers,
                                                       worker_args=["--device", device]))
            scheduler_addr = cluster.address
            click.echo(f"local cluster: scheduler {cluster.address}, {servers} servers, {workers} workers"
                       f"{'' if device == 'cpu' else ' on ' + device}", err=as_json)
        client = stack.enter_context(_client(scheduler_addr) if cluster is None else cluster.client(connect_timeout=10))
        job = client.submit(spec)
        click.echo(f"submitted {job.job_id}: {model_kind.upper()} on {spec.data.uri.split(':')[-1]}, "
                   f"{spec.epochs} epochs", err=as_json)
        model = _follow(job, progress=True, logdir=logdir)
        if save:
            model.save(save)
    m = model.metrics
    baseline = model.prep.get("majority_baseline")
    click.echo(f"test accuracy {m['test_accuracy']:.4f} on the held-out 30% after {m['epoch']} epochs"
               + (f" (always the most frequent class: {baseline:.4f})" if baseline is not None else "")
               + f"; {m['samples_per_s']:.0f} samples/s; {time.perf_counter() - start:.1f} s in all", err=as_json)
    if as_json:
        emit_json({"model": model_kind, "device": device if cluster else None, "job_id": job.job_id,
                   "test_accuracy": m["test_accuracy"], "majority_baseline": baseline,
                   "test_loss": m["test_loss"], "train_loss": m["train_loss"], "epochs": m["epoch"],
                   "samples_per_s": m["samples_per_s"], "train_seconds": m["seconds"],
                   "seconds": time.perf_counter() - start})


@bench.command("kernels")
@click.option("--device", default="gpu:0", show_default=True, help="gpu:N (CuPy), or cpu (NumPy vs PyTorch CPU).")
@click.option("--batch", default=1024, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_kernels(device, batch, as_json):
    """A training step's forward + backward on the worker's kernels against PyTorch (needs torch)."""
    from ps.bench import kernels
    try:
        result = kernels(device, batch, echo=click.echo)
    except (RuntimeError, ValueError) as e:
        click.echo(f"bench kernels: {e}", err=True)
        sys.exit(2)
    if as_json:
        emit_json(result)
