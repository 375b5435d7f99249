"""Who may talk to whom: TLS settings, the bearer token a process sends, the tokens a listening
process accepts and the role each carries, and the interceptor that checks them on every call.

Every role and client reads the same settings (flags or PS_* variables):

- ``--tls-cert/--tls-key``: this process's certificate; ``--tls-ca``: the CA its peers' certificates
  must come from. A listening process with ``--tls-ca`` asks callers for a certificate (mutual TLS).
- ``--token-file``: the token this process sends on every call (``authorization: Bearer ...``).
- ``--auth-file``: on a listening process, the tokens it accepts, one ``ROLE TOKEN [NAME] [quota=N ...]``
  per line. Without one, every caller is let in (a laptop); with one, every call but the health
  check needs a token whose role may call the method (``PERMISSIONS``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import grpc

log = logging.getLogger("ps.security")

MEMBER, USER, ADMIN = "member", "user", "admin"
ROLES = (MEMBER, USER, ADMIN)
#: shortest token an auth file may hold: anything shorter is guessable
MIN_TOKEN_CHARS = 16
HEALTH_PREFIX = "/grpc.health.v1.Health/"

_ANYONE = frozenset(ROLES)
_PEOPLE = frozenset((USER, ADMIN))
_MEMBERS = frozenset((MEMBER,))
#: per service, per method: the roles that may call it. Users act only on their own jobs and models
#: (the handlers check ownership); members are the cluster's own processes; admins act on anything.
PERMISSIONS: dict[str, dict[str, frozenset]] = {
    "ps.v1.Scheduler": {
        "RegisterServer": _MEMBERS, "Heartbeat": _MEMBERS, "ReportReplicaLost": _MEMBERS,
        "RegisterWorker": _MEMBERS, "WorkerHeartbeat": _MEMBERS, "DeregisterWorker": _MEMBERS,
        "LeaseTask": _MEMBERS, "CompleteTask": _MEMBERS, "Clock": _MEMBERS,
        "GetCluster": _ANYONE, "GetShardMap": _ANYONE, "PlanModel": _ANYONE, "DropModel": _ANYONE,
        "DrainServer": frozenset((ADMIN,)),
        "SubmitJob": _PEOPLE, "GetJob": _PEOPLE, "ListJobs": _PEOPLE, "CancelJob": _PEOPLE,
        "DeleteJob": _PEOPLE, "WatchJob": _PEOPLE, "CheckpointJob": _PEOPLE, "FetchWeights": _PEOPLE,
    },
    "ps.v1.ParameterServer": {
        "CreateModel": _ANYONE, "Assign": _ANYONE, "Push": _ANYONE, "Pull": _ANYONE, "PushPull": _ANYONE,
        "DeleteModel": _ANYONE, "Stats": _ANYONE, "SetReplicas": _ANYONE,
        "Replicate": _MEMBERS, "Checkpoint": _MEMBERS, "PullRows": _ANYONE, "PushRows": _ANYONE,
        "PushPullLocal": _ANYONE, "PushAcked": _ANYONE, "PushBatch": _ANYONE, "ApplyAccumulated": _ANYONE,
    },
    "grpc.reflection.v1alpha.ServerReflection": {"ServerReflectionInfo": _ANYONE},
}


class SecurityError(ValueError):
    """Settings that cannot work (a missing file, an expired certificate); the message names the file."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise SecurityError(f"{what} {path}: {e.strerror or e}") from None


# -- TLS -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TLS:
    """A process's certificate and key (PEM files) and the CA it trusts its peers' certificates from.
    ``TLS.from_dir(d)`` takes the files ``paramserver certs`` writes (``as_="user"`` or ``"node"``)."""

    cert: str = ""
    key: str = ""
    ca: str = ""

    def __post_init__(self):
        if bool(self.cert) != bool(self.key):
            raise SecurityError(f"TLS: a certificate needs its key and a key its certificate (--tls-cert "
                                f"{self.cert or '(none)'}, --tls-key {self.key or '(none)'})")
        if not (self.cert or self.ca):
            raise SecurityError("TLS: give a CA (--tls-ca) to verify peers, a certificate (--tls-cert/--tls-key), or both")

    @classmethod
    def from_dir(cls, directory: str | os.PathLike, as_: str = "user") -> "TLS":
        d = Path(directory)
        return cls(cert=str(d / f"{as_}.crt"), key=str(d / f"{as_}.key"), ca=str(d / "ca.crt"))

    def env(self) -> dict[str, str]:
        """The PS_TLS_* variables that give a process started with them these settings (Security.from_env)."""
        return {"PS_TLS_CERT": self.cert, "PS_TLS_KEY": self.key, "PS_TLS_CA": self.ca}

    def _files(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        cert = _read(self.cert, "TLS certificate") if self.cert else None
        key = _read(self.key, "TLS key") if self.key else None
        ca = _read(self.ca, "TLS CA") if self.ca else None
        if cert is not None:
            check_not_expired(cert, self.cert)
        return cert, key, ca

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """For calling out: verify the peer against our CA (the system's when none), show our certificate."""
        cert, key, ca = self._files()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def server_credentials(self) -> grpc.ServerCredentials:
        """For listening: our certificate; with a CA, callers must present one it signed (mutual TLS)."""
        if not self.cert:
            raise SecurityError("TLS: a listening process needs a certificate and key (--tls-cert, --tls-key)")
        cert, key, ca = self._files()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def check_not_expired(pem: bytes, path: str) -> None:
    """Raise SecurityError naming ``path`` if its certificate is not valid now (a peer would refuse it
    with nothing better than a closed connection)."""
    import datetime

    from cryptography import x509
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise SecurityError(f"TLS certificate {path}: not a PEM certificate ({e})") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise SecurityError(f"TLS certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: "
                            f"make a new one (paramserver certs)")
    if cert.not_valid_before_utc > now:
        raise SecurityError(f"TLS certificate {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
                            f"UTC (is this machine's clock right?)")


# -- tokens and roles -------------------------------------------------------------------------------------
def read_token(path: str) -> str:
    token = _read(path, "token file").decode("utf-8", "replace").strip()
    if not token or any(c.isspace() for c in token):
        raise SecurityError(f"token file {path}: expected one token (no spaces) on one line")
    return token


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class Identity:
    """Who a token speaks for: its name (jobs and models it makes are its own), role and quotas."""

    name: str
    role: str
    quotas: Mapping[str, int] = field(default_factory=dict)


#: per-user quotas an auth-file line may set (``jobs=4``); the scheduler's --quota-* flags give defaults
QUOTAS = ("param_bytes", "jobs", "tasks_per_job")


class AuthTable:
    """The tokens a listening process accepts. A token is looked up by comparing its SHA-256 with
    every known one in constant time (no early exit), so timing tells nothing about the tokens."""

    def __init__(self, entries: Iterable[tuple[str, Identity]], source: str = "(given)"):
        self.source = source
        self._entries: list[tuple[bytes, Identity]] = []
        seen: set[bytes] = set()
        for token, ident in entries:
            d = _digest(token)
            if d in seen:
                raise SecurityError(f"auth file {source}: the token of '{ident.name}' is listed twice")
            seen.add(d)
            self._entries.append((d, ident))

    @classmethod
    def load(cls, path: str) -> "AuthTable":
        from ps.limits import parse_size
        entries = []
        for n, line in enumerate(_read(path, "auth file").decode("utf-8", "replace").splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            where = f"auth file {path} line {n}"
            if len(words) < 2:
                raise SecurityError(f"{where}: expected ROLE TOKEN [NAME] [quota=N ...]")
            role, token, rest = words[0], words[1], words[2:]
            if role not in ROLES:
                raise SecurityError(f"{where}: unknown role '{role}' (roles: {', '.join(ROLES)})")
            if len(token) < MIN_TOKEN_CHARS:
                raise SecurityError(f"{where}: a token needs at least {MIN_TOKEN_CHARS} characters")
            name = rest.pop(0) if rest and "=" not in rest[0] else f"{role}-{_digest(token).hex()[:8]}"
            quotas = {}
            for item in rest:
                key, _, value = item.partition("=")
                if key not in QUOTAS or not value:
                    raise SecurityError(f"{where}: '{item}' is not a quota (quotas: "
                                        f"{', '.join(q + '=N' for q in QUOTAS)})")
                try:
                    quotas[key] = parse_size(value)
                except ValueError as e:
                    raise SecurityError(f"{where}: {key}: {e}") from None
            entries.append((token, Identity(name, role, quotas)))
        if not entries:
            raise SecurityError(f"auth file {path}: no tokens in it")
        return cls(entries, path)

    def named(self, name: str) -> Identity | None:
        """The identity called ``name`` (the owner of a job or model), or None."""
        return next((ident for _, ident in self._entries if ident.name == name), None)

    def lookup(self, token: str) -> Identity | None:
        d = _digest(token)
        found = None
        for known, ident in self._entries:
            if hmac.compare_digest(known, d):
                found = ident
        return found


def bearer(metadata) -> str | None:
    """The bearer token in a call's metadata, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = (value.decode() if isinstance(value, bytes) else value).partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


# -- a process's settings --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Security:
    """What this process shows (TLS, a token) and, when it listens, whom it lets in (auth)."""

    tls: TLS | None = None
    token: str | None = None
    auth: AuthTable | None = None

    @classmethod
    def from_settings(cls, tls_cert: str | None = None, tls_key: str | None = None, tls_ca: str | None = None,
                      token_file: str | None = None, auth_file: str | None = None) -> "Security":
        tls = TLS(tls_cert or "", tls_key or "", tls_ca or "") if (tls_cert or tls_key or tls_ca) else None
        if tls is not None:
            tls._files()  # fail now, naming the file, not at the first connection
        return cls(tls=tls, token=read_token(token_file) if token_file else None,
                   auth=AuthTable.load(auth_file) if auth_file else None)

    @classmethod
    def from_env(cls) -> "Security":
        env = os.environ.get
        return cls.from_settings(env("PS_TLS_CERT"), env("PS_TLS_KEY"), env("PS_TLS_CA"), env("PS_TOKEN_FILE"),
                                 env("PS_AUTH_FILE"))

    def with_(self, **changes) -> "Security":
        return dataclasses.replace(self, **changes)

    # -- calling out --
    def secure_channel(self, address: str, options: list) -> grpc.Channel:
        if self.tls is None:
            ch = grpc.insecure_channel(address, options=options)
        else:
            ch = grpc.secure_channel(address, self.tls.channel_credentials(), options=options)
        return grpc.intercept_channel(ch, _TokenInterceptor(self.token)) if self.token else ch

    # -- listening --
    def add_port(self, server, address: str) -> int:
        if self.tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.tls.server_credentials())

    def interceptors(self, aio: bool = False) -> list:
        if self.auth is None:
            return []
        return [_AioAuthInterceptor(self.auth) if aio else _AuthInterceptor(self.auth)]


_lock = threading.Lock()
_current: Security | None = None


def configure(security: Security) -> Security:
    """Set this process's settings (a role does so once, from its flags)."""
    global _current
    with _lock:
        _current = security
    return security


def current() -> Security:
    """This process's settings: the configured ones, else those the PS_* variables name."""
    global _current
    with _lock:
        if _current is None:
            _current = Security.from_env()
        return _current


def caller(context) -> Identity | None:
    """Who made this call (the interceptor already let it in), or None when this process takes
    every caller (no auth file)."""
    auth = current().auth
    if auth is None:
        return None
    token = bearer(context.invocation_metadata())
    return None if token is None else auth.lookup(token)


def owns(who: Identity | None, owner: str) -> bool:
    """May ``who`` act on something ``owner`` made? Without auth, anyone; members and admins, anything."""
    return who is None or who.role != USER or who.name == owner


def check_owner(who: Identity | None, owner: str, what: str) -> None:
    """Raise PermissionDenied unless ``who`` may act on something ``owner`` made."""
    from ps.errors import PermissionDenied
    if not owns(who, owner):
        raise PermissionDenied(f"{what}: it belongs to another user ('{owner}'), not to '{who.name}'")


def owner_for(who: Identity | None, requested: str = "") -> str:
    """The owner of what ``who`` makes: a user makes its own things; a member or admin may make one on a
    user's behalf (the scheduler creating a job's model). Raises PermissionDenied otherwise."""
    from ps.errors import PermissionDenied
    if who is None:
        return requested
    if who.role == USER:
        if requested and requested != who.name:
            raise PermissionDenied(f"user '{who.name}' may not act for '{requested}'")
        return who.name
    return requested or who.name


# -- the interceptors --------------------------------------------------------------------------------------
class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer TOKEN`` to every call."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, d):
        return d._replace(metadata=[*(d.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def refusal(auth: AuthTable, method: str, metadata) -> tuple[grpc.StatusCode, str] | None:
    """Why a call to ``method`` (/package.Service/Method) with ``metadata`` is refused, or None."""
    if method.startswith(HEALTH_PREFIX):
        return None
    return admit(auth, method, bearer(metadata))[1]


def admit(auth: AuthTable, method: str, token: str | None) -> tuple[Identity | None, tuple | None]:
    """(who ``token`` speaks for, None) when it may call ``method``; else (None, (status code, why))."""
    if token is None:
        return None, (grpc.StatusCode.UNAUTHENTICATED,
                      f"{method}: no bearer token: this cluster needs one (--token-file or PS_TOKEN_FILE)")
    who = auth.lookup(token)
    if who is None:
        return None, (grpc.StatusCode.UNAUTHENTICATED, f"{method}: the token is not one this process accepts")
    service, _, name = method.lstrip("/").rpartition("/")
    allowed = PERMISSIONS.get(service, {}).get(name, frozenset())
    if who.role not in allowed:
        return None, (grpc.StatusCode.PERMISSION_DENIED,
                      f"{method}: role '{who.role}' ({who.name}) may not call it"
                      + (f" (allowed: {', '.join(sorted(allowed))})" if allowed else ""))
    return who, None


_HANDLER_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
                  (False, True): grpc.unary_stream_rpc_method_handler,
                  (True, False): grpc.stream_unary_rpc_method_handler,
                  (True, True): grpc.stream_stream_rpc_method_handler}


def _refusing(handler, behavior):
    """A handler of ``handler``'s kind whose behavior is ``behavior`` (which ends the call)."""
    make = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    return make(behavior, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class _AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, auth: AuthTable):
        self.auth = auth

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        why = refusal(self.auth, details.method, details.invocation_metadata)
        if why is None or handler is None:
            return handler

        def refuse(request, context):
            log.warning("refused %s from %s: %s", details.method, context.peer(), why[1])
            context.abort(*why)
        return _refusing(handler, refuse)


class _AioAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: AuthTable):
        self.auth = auth

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        why = refusal(self.auth, details.method, details.invocation_metadata)
        if why is None or handler is None:
            return handler

        async def refuse(request, context):
            log.warning("refused %s from %s: %s", details.method, context.peer(), why[1])
            await context.abort(*why)
        return _refusing(handler, refuse)
