"""gRPC on HTTP/2 (issue 17 item 4): which call a request is, and refusals a gRPC client can read.

A gRPC call is a POST of ``/package.Service/Method`` with ``content-type: application/grpc``; its
service and method are facts for policy (``grpc.service``, ``grpc.method``) and fields of the event.
Its outcome is the ``grpc-status`` of the response's trailers (or of a trailers-only response's
head). A refused call is answered as a gRPC server would answer it: HTTP 200, a trailers-only
response whose ``grpc-status`` stands for the reason code (:data:`~sidecar.errors.GRPC_STATUS`) and
whose ``grpc-message`` is the refusal's message; the reason code is in ``Proxy-Status`` as on
every refusal.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

from multidict import CIMultiDictProxy

from sidecar.errors import GRPC_STATUS, GRPC_UNKNOWN, Refusal, RequestRefused, refusal_headers
from sidecar.exchange import Exchange
from sidecar.forward.transport import UpstreamResponse
from sidecar.http.incoming import Answer, IncomingRequest

CONTENT_TYPE = "application/grpc"
TIMEOUT = "grpc-timeout"
UNITS: Mapping[str, float] = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}  # seconds each
SENT_UNITS = ("n", "u", "m", "S", "M", "H")  # the finest unit whose value fits 8 digits is what goes upstream
BAD_TIMEOUT = RequestRefused("bad_request", "grpc: grpc-timeout must be one value of 1 to 8 digits and a unit "
                                            "(H, M, S, m, u or n)")
EXPIRED = RequestRefused("deadline_exceeded", "grpc: the call's grpc-timeout ran out before the upstream answered")
MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if c != 0x25)  # gRPC's percent-encoding keeps these


def is_grpc(request: IncomingRequest) -> bool:
    """A gRPC call, by its content type (``application/grpc``, ``application/grpc+proto``...)."""
    content_type = request.headers.get("Content-Type", "")
    return content_type == CONTENT_TYPE or content_type.startswith((CONTENT_TYPE + "+", CONTENT_TYPE + ";"))


def call_of(path: str) -> tuple[str | None, str | None]:
    """``/package.Service/Method`` -> (service, method); (None, None) for a path of another shape."""
    service, slash, method = path.removeprefix("/").partition("/")
    if not path.startswith("/") or not slash or not service or not method or "/" in method:
        return None, None
    return service, method


def parse_timeout(value: str) -> float:
    """``grpc-timeout`` (``TimeoutValue TimeoutUnit``: at most 8 digits, then H, M, S, m, u or n) in seconds."""
    digits, unit = value[:-1], value[-1:]
    if not (0 < len(digits) <= 8 and digits.isascii() and digits.isdigit() and unit in UNITS):
        raise BAD_TIMEOUT
    return int(digits) * UNITS[unit]


def format_timeout(seconds: float) -> str:
    """The remaining budget as ``grpc-timeout``, rounded down (never later than the caller's deadline)."""
    for unit in SENT_UNITS:
        value = int(max(seconds, 0.0) / UNITS[unit])
        if value < 10**8:
            return f"{value}{unit}"
    return f"{10**8 - 1}H"


def call_timeout(headers: CIMultiDictProxy[str]) -> float | None:
    """The call's own timeout in seconds (None: it has none); more than one ``grpc-timeout`` is refused."""
    values = headers.getall(TIMEOUT, ())
    if not values:
        return None
    if len(values) > 1:
        raise BAD_TIMEOUT
    return parse_timeout(values[0].strip())


def note_call(ex: Exchange, path: str) -> None:
    """The exchange is a gRPC call: its service and method, for policy and the event."""
    ex.protocol = "grpc"
    ex.grpc_service, ex.grpc_method = call_of(path)


def grpc_refusal(request: IncomingRequest, ex: Exchange, refusal: Refusal) -> Answer | None:
    """A refusal of a gRPC call as gRPC answers one (trailers-only, HTTP 200); None for any other request."""
    if ex.protocol != "grpc" and not is_grpc(request):
        return None
    ex.protocol, ex.status = "grpc", 200  # the status the client is sent; the reason code says why
    ex.grpc_status = GRPC_STATUS.get(refusal.reason, GRPC_UNKNOWN)
    headers = refusal_headers(refusal)
    headers["Content-Type"] = CONTENT_TYPE
    headers["grpc-status"] = str(ex.grpc_status)
    headers["grpc-message"] = quote(refusal.message, safe=MESSAGE_SAFE)
    return request.respond(200, None, headers, None)


def grpc_status(upstream: UpstreamResponse) -> int | None:
    """The call's status: its trailers', or a trailers-only response's head."""
    value = upstream.trailers.get("grpc-status") or upstream.headers.get("grpc-status")
    return int(value) if value is not None and value.isdigit() else None
