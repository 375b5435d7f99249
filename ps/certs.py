"""TLS material and auth tokens for a test or small cluster.

``make(directory, hosts)`` writes a self-signed CA, one member certificate (server and client
auth, valid for the given hosts plus localhost, 127.0.0.1 and ::1), one user certificate (client
auth only), a random token per role (``member.token``, ``user.token``, ``admin.token``) and the
``tokens`` file a listening process loads. ``make_cert`` signs one more pair with an existing CA
(an expired member, another client); ``describe`` summarises a directory's certificates.

Keys are EC P-256, PEM PKCS8, unencrypted, mode 0600 like the tokens; certificates are 0644.
This is for tests and small clusters: a production cluster should use its own PKI.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: names every member certificate is valid for, so a process can always call its own host
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
ROLES = ("member", "user", "admin")
TOKENS_HEADER = "# ROLE TOKEN [NAME] [quota=VALUE ...]\n"
#: certificates start this far in the past, so a host whose clock lags a little accepts them
CLOCK_SKEW = timedelta(minutes=5)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def make(directory: str | os.PathLike, hosts: list[str], days: int = 365, *,
         now: datetime | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Write a CA, a member and a user certificate, the role tokens and the tokens file into
    ``directory``; return every file written, by name. Refuses to replace an existing
    ``ca.key`` (FileExistsError) unless ``overwrite``."""
    hosts = _check_hosts(hosts)
    _check_days(days)
    d = _directory(directory)
    if (d / "ca.key").exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, "refusing to overwrite the CA key (pass overwrite=True)",
                              str(d / "ca.key"))
    now = _utc(now)
    ca_key = _new_key()
    ca = _certificate("paramserver CA", ca_key.public_key(), None, ca_key, now=now, days=days)
    written = _write_pair(d, "ca", ca, ca_key)
    for name, cn, names, client_only in (("node", "paramserver member", [*hosts, *LOCAL_HOSTS], False),
                                         ("user", "paramserver user", [], True)):
        key = _new_key()
        cert = _certificate(cn, key.public_key(), ca, ca_key, now=now, days=days, hosts=names,
                            client_only=client_only)
        written |= _write_pair(d, name, cert, key)
    tokens = {role: secrets.token_urlsafe(32) for role in ROLES}
    for role, token in tokens.items():
        written[f"{role}.token"] = _write(d / f"{role}.token", f"{token}\n".encode(), 0o600)
    lines = "".join(f"{role} {token} {role}\n" for role, token in tokens.items())
    written["tokens"] = _write(d / "tokens", (TOKENS_HEADER + lines).encode(), 0o600)
    return written


def make_cert(directory: str | os.PathLike, name: str, ca_dir: str | os.PathLike,
              hosts: Iterable[str] = (), days: int = 365, now: datetime | None = None,
              client_only: bool = False) -> tuple[Path, Path]:
    """Sign ``NAME.crt``/``NAME.key`` in ``directory`` with the CA in ``ca_dir``; return (cert,
    key). A member certificate (not ``client_only``) is also valid for localhost, like make()'s."""
    if not _NAME.fullmatch(name) or name == "ca":
        raise ValueError(f"bad certificate name {name!r}: letters, digits, '.', '_', '-', not 'ca'")
    hosts = _check_hosts(hosts)
    _check_days(days)
    ca_dir = Path(ca_dir)
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    names = hosts if client_only else [*hosts, *LOCAL_HOSTS]
    key = _new_key()
    cert = _certificate(f"paramserver {name}", key.public_key(), ca, ca_key, now=_utc(now),
                        days=days, hosts=names, client_only=client_only)
    written = _write_pair(_directory(directory), name, cert, key)
    return written[f"{name}.crt"], written[f"{name}.key"]


def describe(directory: str | os.PathLike) -> str:
    """One line per certificate in ``directory`` (subject CN, SANs, expiry), and the roles in its
    tokens file; never the tokens themselves."""
    d = Path(directory)
    now = datetime.now(timezone.utc)
    lines = []
    for path in sorted(d.glob("*.crt"), key=lambda p: (p.name != "ca.crt", p.name)):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        until = cert.not_valid_after_utc
        line = f"{path.name}: CN={cn}"
        if sans := _sans(cert):
            line += f", hosts {', '.join(sans)}"
        line += f", {'EXPIRED' if until < now else 'valid until'} {until:%Y-%m-%d %H:%M} UTC"
        lines.append(line)
    tokens = d / "tokens"
    if tokens.exists():
        roles = [ln.split()[0] for ln in tokens.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        lines.append(f"tokens: {', '.join(roles)} (each role's token is also in ROLE.token)")
    return "\n".join(lines)


def _certificate(cn: str, public_key, issuer: x509.Certificate | None, issuer_key, *, now: datetime,
                 days: int, hosts: Iterable[str] = (), client_only: bool = False) -> x509.Certificate:
    """A certificate for ``public_key`` signed by ``issuer_key``; self-signed CA when ``issuer``
    is None, otherwise a leaf for ``hosts`` with client (and, unless ``client_only``, server) auth."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    is_ca = issuer is None
    b = (x509.CertificateBuilder()
         .subject_name(subject)
         .issuer_name(subject if is_ca else issuer.subject)
         .public_key(public_key)
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - CLOCK_SKEW)
         .not_valid_after(now + timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
    if is_ca:
        return b.add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True) \
                .sign(issuer_key, hashes.SHA256())
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client_only else \
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    b = (b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                         critical=False)
         .add_extension(_key_usage(digital_signature=True), critical=True)
         .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if names := list(dict.fromkeys(hosts)):
        b = b.add_extension(x509.SubjectAlternativeName([_general_name(h) for h in names]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _key_usage(**set_true) -> x509.KeyUsage:
    flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment",
                           "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign",
                           "encipher_only", "decipher_only"), False)
    return x509.KeyUsage(**(flags | set_true))


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in san]


def _check_hosts(hosts: Iterable[str]) -> list[str]:
    if isinstance(hosts, str):  # a lone "a,b" would otherwise be taken as its characters
        raise TypeError(f"hosts must be a list of names, not the string {hosts!r}")
    hosts = list(hosts)
    for h in hosts:
        if not isinstance(h, str) or not h or not h.isascii() or any(c.isspace() or c == "," for c in h):
            raise ValueError(f"bad host {h!r}: need a non-empty ASCII name or IP address "
                             "without whitespace or commas")
    return hosts


def _check_days(days: int) -> None:
    if not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a whole number of at least 1, not {days!r}")


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    return now if now.tzinfo else now.replace(tzinfo=timezone.utc)  # naive: taken as UTC, as x509 does


def _directory(directory: str | os.PathLike) -> Path:
    d = Path(directory)
    if not d.is_dir():
        d.mkdir(parents=True)
        os.chmod(d, 0o700)  # explicitly: mkdir's mode is masked by the umask
    return d


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_pair(d: Path, name: str, cert: x509.Certificate, key) -> dict[str, Path]:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return {f"{name}.key": _write(d / f"{name}.key", key_pem, 0o600),
            f"{name}.crt": _write(d / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)}


def _write(path: Path, data: bytes, mode: int) -> Path:
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        os.fchmod(f.fileno(), mode)  # before writing: a file being overwritten may have had a wider mode
        f.write(data)
    return path
