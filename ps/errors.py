"""Errors shared by every role: each carries the gRPC status code it travels as.

Servers raise them from the core and the servicer turns them into a status; the client
turns a status back into the same class, with the server's message.
"""

from __future__ import annotations

import grpc


class PSError(Exception):
    """Base class: ``code`` is the gRPC status this error travels as."""

    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(PSError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(PSError, KeyError):
    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AlreadyExists(PSError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(PSError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(PSError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(PSError, ConnectionError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(PSError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(PSError):
    code = grpc.StatusCode.CANCELLED


class Aborted(PSError):
    """A sequencing check failed: what was sent belongs to a step that is over (a bsp gradient too late)."""
    code = grpc.StatusCode.ABORTED


class Unauthenticated(PSError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(PSError, PermissionError):
    code = grpc.StatusCode.PERMISSION_DENIED


_BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                                      ResourceExhausted, Unavailable, DeadlineExceeded, Cancelled, Aborted,
                                      Unauthenticated, PermissionDenied)}


def from_rpc_error(err: grpc.RpcError, peer: str, what: str) -> PSError:
    """The PSError for a failed call to ``peer`` doing ``what``, keeping the server's message."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    detail = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code, PSError)
    exc = cls(f"{what} on {peer}: {code.name}: {detail}")
    exc.code = code
    return exc


#: longest status message, in bytes on the wire (grpc percent-encodes all but printable ASCII):
#: a client drops a response whose trailers pass 8 KiB (sometimes) or 16 KiB (always), and
#: reports RESOURCE_EXHAUSTED instead of the real status
MAX_STATUS_MESSAGE_BYTES = 6000


def short_message(msg: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """``msg`` cut to ``limit`` bytes as grpc sends it, saying how much was left out."""
    if len(msg) * 12 <= limit:  # 4 UTF-8 bytes a character, each percent-encoded: it fits
        return msg
    size = 0
    for i, ch in enumerate(msg):
        size += 1 if " " <= ch <= "~" and ch != "%" else 3 * len(ch.encode("utf-8", "replace"))
        if size > limit:
            return f"{msg[:i]} ... ({len(msg) - i} more characters)"
    return msg


def abort(context: grpc.ServicerContext, exc: PSError) -> None:
    """End an RPC with the status that ``exc`` travels as (raises, as context.abort does)."""
    context.abort(exc.code, short_message(str(exc)))
