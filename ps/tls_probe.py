"""Why a connection does not come up, when TLS is the reason: grpc reports a refused handshake as
"UNAVAILABLE: failed to connect" (or a closed socket) whatever the cause, so a process that cannot
connect shakes hands once more with Python's ssl, which says what the peer objected to."""

from __future__ import annotations

import socket
import ssl

#: seconds for the probe's connection, its handshake and the wait for the peer's verdict on our certificate
PROBE_TIMEOUT_S = 1.0

#: TLS alerts a peer sends when it refuses our certificate, and what they mean to a user
_ALERTS = {
    "UNKNOWN_CA": "it does not trust our certificate's CA (is {cert} signed by the cluster's CA?)",
    "CERTIFICATE_EXPIRED": "it says our certificate {cert} has expired",
    "CERTIFICATE_REQUIRED": "it requires a client certificate (mutual TLS): give one (--tls-cert/--tls-key)",
    "HANDSHAKE_FAILURE": "it requires a client certificate (mutual TLS): give one (--tls-cert/--tls-key)",
    "BAD_CERTIFICATE": "it refused our certificate {cert}",
    "CERTIFICATE_UNKNOWN": "it refused our certificate {cert}",
    "UNSUPPORTED_CERTIFICATE": "it refused our certificate {cert} (not usable for a client: extended key usage?)",
    "DECRYPT_ERROR": "it refused our certificate {cert} (the key does not match?)",
}


def _connect(address: str) -> socket.socket | None:
    host, _, port = address.rpartition(":")
    try:
        return socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S)
    except (OSError, ValueError):
        return None  # nobody listening: not a TLS matter


def _speaks_tls(address: str) -> bool:
    sock = _connect(address)
    if sock is None:
        return False
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with ctx.wrap_socket(sock) as s:
            s.do_handshake()
        return True
    except (OSError, ssl.SSLError):
        return False
    finally:
        sock.close()


def _refused(tls) -> str:
    """Why a peer that hung up right after the handshake refused our certificate, as far as we can tell."""
    if not tls.cert:
        return "it requires a client certificate (mutual TLS): give one (--tls-cert/--tls-key)"
    if tls.ca:
        from cryptography import x509
        from cryptography.exceptions import InvalidSignature
        try:
            with open(tls.cert, "rb") as f, open(tls.ca, "rb") as g:
                cert, ca = x509.load_pem_x509_certificate(f.read()), x509.load_pem_x509_certificate(g.read())
            cert.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError):
            return f"it does not trust our certificate's CA: {tls.cert} is not signed by {tls.ca}"
        except OSError:
            pass
    return f"it hung up after the handshake: it refused our certificate {tls.cert} (another CA? not for client use?)"


def diagnose(address: str, security=None) -> str | None:
    """What is wrong with TLS between this process (``security``, default its own settings) and the
    peer at ``address``, in words; None when TLS is not the problem (or nobody listens)."""
    from ps import security as sec
    settings = security or sec.current()
    tls = settings.tls
    if tls is None:
        if _speaks_tls(address):
            return ("it speaks TLS and this process does not: give it the cluster's CA (--tls-ca or PS_TLS_CA; "
                    "ps.Client(address, tls=...))")
        return None
    sock = _connect(address)
    if sock is None:
        return None
    ctx = ssl.create_default_context(cafile=tls.ca or None)
    ctx.set_alpn_protocols(["h2"])
    cert = tls.cert or "(none)"
    if tls.cert:
        try:
            ctx.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as e:
            return f"our certificate {tls.cert} or key {tls.key} cannot be used: {e}"
    host = address.rpartition(":")[0].strip("[]")
    try:
        with ctx.wrap_socket(sock, server_hostname=host) as s:
            s.do_handshake()
            try:  # TLS 1.3: the peer judges our certificate after the handshake (an alert, or it hangs up)
                if s.recv(1) == b"":
                    return _refused(tls)
            except (socket.timeout, TimeoutError):
                pass
        return None
    except ssl.SSLCertVerificationError as e:
        return f"its certificate is not trusted: {e.verify_message} (our CA: {tls.ca or 'the system CAs'})"
    except ssl.SSLError as e:
        reason = (e.reason or "").upper()
        for key, text in _ALERTS.items():
            if key in reason:
                return text.format(cert=cert)
        if "WRONG_VERSION" in reason or "RECORD_LAYER" in reason or "PACKET_LENGTH" in reason:
            return "it does not speak TLS (a plaintext process?) and this process uses TLS"
        return f"the TLS handshake failed: {e.reason or e}"
    except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError):
        return "it closed the connection during the TLS handshake (a plaintext process, or one that refused us)"
    except OSError:
        return None
    finally:
        sock.close()
