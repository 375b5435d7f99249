"""ps.certs: the files, modes, certificate contents and tokens it writes, and real TLS handshakes
(mutual auth over gRPC) with what it made."""

from __future__ import annotations

import ipaddress
import stat
from concurrent import futures
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ps import certs

HOSTS = ["ps-0.example", "*.ps-server.default.svc", "10.1.2.3", "fd00::7"]
FILES = {"ca.crt", "ca.key", "node.crt", "node.key", "user.crt", "user.key",
         "member.token", "user.token", "admin.token", "tokens"}


@pytest.fixture
def made(tmp_path):
    d = tmp_path / "certs"
    return d, certs.make(d, HOSTS)


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def eku(cert) -> list:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def cn(cert) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_files_and_modes(made):
    d, written = made
    assert set(written) == FILES
    assert all(p == d / name and p.is_file() for name, p in written.items())
    assert mode(d) == 0o700
    for name, p in written.items():
        assert mode(p) == (0o644 if name.endswith(".crt") else 0o600), name
    assert (d / "ca.key").read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted


def test_ca(made):
    d, _ = made
    ca = load(d / "ca.crt")
    assert cn(ca) == "paramserver CA" and ca.issuer == ca.subject
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    ca.verify_directly_issued_by(ca)


def test_node_cert_sans_eku_and_chain(made):
    d, _ = made
    ca, node = load(d / "ca.crt"), load(d / "node.crt")
    assert cn(node) == "paramserver member"
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"ps-0.example", "*.ps-server.default.svc", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("10.1.2.3", "fd00::7", "127.0.0.1", "::1")}
    assert eku(node) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not node.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    node.verify_directly_issued_by(ca)


def test_user_cert_is_client_only(made):
    d, _ = made
    user = load(d / "user.crt")
    assert cn(user) == "paramserver user"
    assert eku(user) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    user.verify_directly_issued_by(load(d / "ca.crt"))


def test_a_second_ca_does_not_verify(made, tmp_path):
    d, _ = made
    other = certs.make(tmp_path / "other", [])
    with pytest.raises((ValueError, InvalidSignature)):
        load(other["node.crt"]).verify_directly_issued_by(load(d / "ca.crt"))


def test_validity_window_and_expired_certificate(tmp_path):
    real_now = datetime.now(timezone.utc)
    fresh = load(certs.make(tmp_path / "fresh", [], days=30)["node.crt"])
    assert fresh.not_valid_before_utc <= real_now - timedelta(minutes=4)  # clock-skew margin
    assert abs(fresh.not_valid_after_utc - (real_now + timedelta(days=30))) < timedelta(minutes=1)

    old = certs.make(tmp_path / "old", ["h"], days=1, now=real_now - timedelta(days=730))
    for name in ("ca.crt", "node.crt", "user.crt"):
        assert load(old[name]).not_valid_after_utc < real_now, name
    assert "EXPIRED" in certs.describe(tmp_path / "old")


def test_tokens(made):
    d, _ = made
    lines = (d / "tokens").read_text().splitlines()
    assert lines[0] == "# ROLE TOKEN [NAME] [quota=VALUE ...]"
    entries = [ln.split() for ln in lines[1:]]
    assert [(e[0], e[2]) for e in entries] == [("member", "member"), ("user", "user"), ("admin", "admin")]
    for role, token, _name in entries:
        assert (d / f"{role}.token").read_text() == f"{token}\n"
        assert len(token) >= 43
    assert len({e[1] for e in entries}) == 3


def test_refuses_to_overwrite_the_ca(made):
    d, _ = made
    ca_key = (d / "ca.key").read_bytes()
    with pytest.raises(FileExistsError, match="ca.key"):
        certs.make(d, ["h"])
    assert (d / "ca.key").read_bytes() == ca_key
    certs.make(d, ["h"], overwrite=True)
    assert (d / "ca.key").read_bytes() != ca_key


@pytest.mark.parametrize("bad", ["", "a b", "a,b", "tab\there", "nodé"])
def test_bad_host_is_named(tmp_path, bad):
    with pytest.raises(ValueError, match=repr(bad).replace("\\", "\\\\")):
        certs.make(tmp_path / "c", ["ok.example", bad])
    assert not (tmp_path / "c").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError):
        certs.make(tmp_path / "c", "a,b")  # a string, not a list of hosts
    with pytest.raises(ValueError, match="days"):
        certs.make(tmp_path / "c", ["h"], days=0)


def test_make_cert(made, tmp_path):
    d, _ = made
    crt, key = certs.make_cert(tmp_path / "extra", "worker-1", d, hosts=["w1.example"], client_only=True)
    assert (crt.name, key.name) == ("worker-1.crt", "worker-1.key")
    assert (mode(crt), mode(key)) == (0o644, 0o600)
    cert = load(crt)
    cert.verify_directly_issued_by(load(d / "ca.crt"))
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["w1.example"]
    with pytest.raises(ValueError):
        certs.make_cert(d, "ca", d)


def test_describe(made):
    d, _ = made
    text = certs.describe(d)
    assert text.splitlines()[0].startswith("ca.crt: CN=paramserver CA")
    assert "node.crt: CN=paramserver member, hosts ps-0.example, *.ps-server.default.svc" in text
    assert "valid until" in text and "tokens: member, user, admin" in text
    for role in certs.ROLES:
        assert (d / f"{role}.token").read_text().strip() not in text


# --- real TLS handshakes: a health service requiring client certificates --------------------------

def serve(d, cert="node"):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    creds = grpc.ssl_server_credentials([((d / f"{cert}.key").read_bytes(), (d / f"{cert}.crt").read_bytes())],
                                        root_certificates=(d / "ca.crt").read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, port


def check(ca_dir, port, host="127.0.0.1", client_dir=None, client="user"):
    client_dir = client_dir or ca_dir
    creds = grpc.ssl_channel_credentials((ca_dir / "ca.crt").read_bytes(),
                                         (client_dir / f"{client}.key").read_bytes(),
                                         (client_dir / f"{client}.crt").read_bytes())
    with grpc.secure_channel(f"{host}:{port}", creds) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)


@pytest.fixture
def server(made):
    d, _ = made
    srv, port = serve(d)
    yield d, port
    srv.stop(None)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("client", ["user", "node"])
def test_mutual_tls_handshake(server, host, client):
    d, port = server
    assert check(d, port, host, client=client).status == health_pb2.HealthCheckResponse.SERVING


def test_client_from_another_ca_is_refused(server, tmp_path):
    d, port = server
    other = tmp_path / "other"
    certs.make(other, [])
    with pytest.raises(grpc.RpcError) as e:
        check(d, port, client_dir=other)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_expired_member_certificate_is_refused(made, tmp_path):
    d, _ = made
    certs.make_cert(d, "stale", d, days=1, now=datetime.now(timezone.utc) - timedelta(days=730))
    srv, port = serve(d, cert="stale")
    try:
        with pytest.raises(grpc.RpcError) as e:
            check(d, port)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "expired" in e.value.details()
    finally:
        srv.stop(None)
