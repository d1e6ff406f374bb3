"""The error tree and the one reason -> status mapping.

Every refusal the sidecar makes is a :class:`Refusal` carrying a stable reason code.
The same code appears in the response body, the trust-decision event and the metrics.

    Refusal                       any refusal of a request (reason code -> HTTP status)
      RequestRefused              malformed or over-limit requests, trust-boundary checks
      IdentityRefused             unverifiable peers and tokens
      PolicyRefused               policy said no (or could not say yes)
      TaskRefused                 unknown, ended or revoked tasks
      CredentialUnavailable       no valid credential could be had for the upstream
      UpstreamFailed              the upstream could not be reached or did not answer
    RecordedFailure               a defect inside an exchange, already recorded as internal_error
    ConfigError                   one problem in a config or policy file, with its path

Messages are lowercase, prefixed by the component and say what was expected. They never
contain a secret: callers pass names and reasons, never values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus

import orjson

PROXY_NAME = "sidecar"  # in Proxy-Status, Via and Server: one name, never our stack and its versions

STATUS: dict[str, int] = {
    "allowed": 200,
    "approved": 200,
    "unknown_upstream": 403,
    "browser_origin": 403,
    "host_mismatch": 403,
    "tls_required": 403,
    "no_client_cert": 401,
    "peer_unverified": 401,
    "foreign_trust_domain": 403,
    "token_invalid": 401,
    "no_matching_rule": 403,
    "rule_denied": 403,
    "condition_error": 403,
    "approval_timeout": 403,
    "approval_denied": 403,
    "rate_limited": 429,
    "budget_exhausted": 429,
    "unknown_task": 403,
    "task_ended": 403,
    "revoked": 403,
    "unknown_session": 404,
    "session_mismatch": 403,
    "auth_metadata_unreachable": 502,
    "auth_metadata_refused": 502,
    "auth_token_refused": 502,
    "credential_unavailable": 503,
    "log_unavailable": 503,
    "upstream_unreachable": 502,
    "upstream_protocol_error": 502,
    "upstream_answer_too_large": 502,
    "upstream_answer_invalid": 502,
    "upstream_timeout": 504,
    "headers_too_large": 431,
    "body_too_large": 413,
    "request_timeout": 408,
    "bad_request": 400,
    "aws_chunked_invalid": 400,
    "method_not_allowed": 405,
    "request_override": 400,
    "credential_parameter": 400,
    "not_found": 404,
    "unauthorized": 401,
    "internal_error": 500,
    "overloaded": 503,
    "protocol_abuse": 429,
    "deadline_exceeded": 504,
}

# RFC 9209 Proxy-Status error types, per reason code (others use "http_request_denied").
PROXY_STATUS_ERROR: dict[str, str] = {
    "upstream_unreachable": "connection_refused",
    "upstream_protocol_error": "http_protocol_error",
    "upstream_answer_too_large": "http_response_body_size",
    "upstream_answer_invalid": "http_protocol_error",
    "upstream_timeout": "connection_timeout",
    "headers_too_large": "http_request_error",
    "body_too_large": "http_request_error",
    "request_timeout": "http_request_error",
    "bad_request": "http_request_error",
    "protocol_abuse": "http_protocol_error",
    "aws_chunked_invalid": "http_request_error",
    "credential_unavailable": "proxy_internal_error",
    "auth_metadata_unreachable": "proxy_internal_error",
    "log_unavailable": "proxy_internal_error",
    "internal_error": "proxy_internal_error",
}


# MCP refusals of one JSON-RPC request are JSON-RPC errors (HTTP 200): one code per family of reasons,
# in JSON-RPC's implementation-defined server-error range (-32000 to -32099).
RPC_SERVER_ERROR = -32000  # any other reason
RPC_ERROR_CODE: dict[str, int] = {
    **dict.fromkeys(("no_matching_rule", "rule_denied", "condition_error"), -32001),  # policy said no
    **dict.fromkeys(("approval_timeout", "approval_denied"), -32002),  # a held request not approved
    "rate_limited": -32003,
    **dict.fromkeys(("credential_unavailable", "auth_metadata_unreachable", "auth_metadata_refused",
                     "auth_token_refused"), -32004),  # no credential the upstream takes
    **dict.fromkeys(("bad_request", "request_override", "credential_parameter"), -32005),  # its method or params
    **dict.fromkeys(("unknown_task", "task_ended", "revoked"), -32006),
    **dict.fromkeys(("upstream_unreachable", "upstream_protocol_error", "upstream_timeout",
                     "upstream_answer_too_large", "upstream_answer_invalid"), -32007),
}
# A2A defines -32001 to -32009 itself (TaskNotFoundError is -32001): its refusals take the same families
# forty lower, so an A2A client never mistakes a refusal for one of the remote agent's own errors.
A2A_SHIFT = -40
RPC_ERROR_CODES: dict[str, tuple[int, dict[str, int]]] = {  # protocol -> (any other reason, per reason)
    "mcp": (RPC_SERVER_ERROR, RPC_ERROR_CODE),
    "a2a": (RPC_SERVER_ERROR + A2A_SHIFT, {reason: code + A2A_SHIFT for reason, code in RPC_ERROR_CODE.items()}),
}


# gRPC refusals are gRPC statuses (HTTP 200, grpc-status, grpc-message the refusal's message), so that a
# gRPC client sees why: https://grpc.github.io/grpc/core/md_doc_statuscodes.html. Any other reason: UNKNOWN.
GRPC_UNKNOWN = 2
GRPC_STATUS: dict[str, int] = {
    **dict.fromkeys(("bad_request", "aws_chunked_invalid", "request_override", "credential_parameter",
                     "method_not_allowed"), 3),
    "approval_timeout": 4,  # DEADLINE_EXCEEDED: held for an approval that did not come in time
    **dict.fromkeys(("upstream_timeout", "request_timeout", "deadline_exceeded"), 4),
    **dict.fromkeys(("not_found", "unknown_session"), 5),  # NOT_FOUND
    **dict.fromkeys(("no_matching_rule", "rule_denied", "condition_error", "approval_denied", "unknown_upstream",
                     "browser_origin", "host_mismatch", "tls_required", "foreign_trust_domain", "unknown_task",
                     "task_ended", "revoked", "session_mismatch"), 7),  # PERMISSION_DENIED
    **dict.fromkeys(("rate_limited", "overloaded", "headers_too_large", "body_too_large", "protocol_abuse"),
                    8),  # RESOURCE_EXHAUSTED
    **dict.fromkeys(("upstream_protocol_error", "upstream_answer_too_large", "upstream_answer_invalid",
                     "internal_error"), 13),  # INTERNAL
    **dict.fromkeys(("upstream_unreachable", "credential_unavailable", "log_unavailable"), 14),  # UNAVAILABLE
    **dict.fromkeys(("no_client_cert", "peer_unverified", "token_invalid", "unauthorized"), 16),  # UNAUTHENTICATED
}

def status_for(reason: str) -> int:
    """The HTTP status of a reason code; an unknown code is an internal error."""
    return STATUS.get(reason, 500)


def refusal_response(reason: str, message: str, *, retry_after: int | None = None) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 refusal as bytes, for where no HTTP server runs yet
    (before or instead of one): the same body and Proxy-Status as every other refusal."""
    status = status_for(reason)
    body = json.dumps({"error": reason, "message": message}).encode()
    error = PROXY_STATUS_ERROR.get(reason, "http_request_denied")
    retry = f"Retry-After: {retry_after}\r\n" if retry_after is not None else ""
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f'Proxy-Status: {PROXY_NAME}; error={error}; details="{reason}"\r\n'
        f"{retry}Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def refusal_headers(refusal: Refusal) -> dict[str, str]:
    """The headers every refusal carries, whatever its body: Proxy-Status (RFC 9209), no-store, Retry-After."""
    error = PROXY_STATUS_ERROR.get(refusal.reason, "http_request_denied")
    headers = {"Proxy-Status": f'{PROXY_NAME}; error={error}; details="{refusal.reason}"',
               "Cache-Control": "no-store"}
    if refusal.retry_after is not None:
        headers["Retry-After"] = str(refusal.retry_after)
    return headers


def refusal_body(refusal: Refusal) -> bytes:
    """The one body of every refusal: its reason code and what was expected."""
    return orjson.dumps({"error": refusal.reason, "message": refusal.message})


class Refusal(Exception):
    """A request refused with a stable reason code and an operator-readable message."""

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        detail: str | None = None,
        retry_after: int | None = None,
        rule_id: str | None = None,
    ) -> None:
        if reason not in STATUS:
            raise ValueError(f"errors: unknown reason code {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.detail = detail
        self.retry_after = retry_after
        self.rule_id = rule_id

    @property
    def status(self) -> int:
        return STATUS[self.reason]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, {self.message!r})"


class RequestRefused(Refusal):
    """Malformed or over-limit requests, and the outbound listener's trust-boundary checks."""


class IdentityRefused(Refusal):
    """A peer certificate or bearer token that could not be verified."""


class PolicyRefused(Refusal):
    """The policy denied the request, or could not evaluate a condition."""


class TaskRefused(Refusal):
    """The task named by the request is unknown, has ended or was revoked."""


class CredentialUnavailable(Refusal):
    """No valid credential could be obtained for the upstream."""

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__("credential_unavailable", message, detail=detail)


class UpstreamFailed(Refusal):
    """The upstream could not be reached, reset the connection or timed out."""


class RecordedFailure(Exception):
    """A defect inside an exchange that was already recorded (``internal_error``, one event).

    The server answers it with a 500 refusal, or ends the connection when the response had begun,
    and writes no second event for it.
    """


@dataclass(frozen=True, slots=True)
class ConfigError:
    """One problem in a config or policy file: where it is, and what was expected."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigInvalid(Exception):
    """A configuration with one or more problems; carries all of them."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))
