"""The outbound listener's HTTP/1.1 security corpus: bypass spellings, ambiguous framing, forward-proxy
tricks. Each table is a specification in ``tests/core/test_outbound.py`` and is fed, byte for byte, to
both HTTP/1.1 servers by ``tests/http1/test_differential.py`` (security reviews 1 and 4, issue 16)."""

from __future__ import annotations

# (raw target, status, reason, path forwarded or None): against POLICY (tests/scenarios/outbound.py)
BYPASS_TARGETS = [
    # a route-prefix path that climbs out of its upstream stays inside it (dot segments of the rest)
    ("/billing/../nowhere/x", 403, "no_matching_rule", None),
    ("/billing/v1/../../v1/ok", 200, "allowed", "/api/v1/ok"),
    # encoded dot segments are dot segments (matched and forwarded in canonical form)
    ("/billing/v1/%2e%2e/v1/admin/x", 403, "rule_denied", None),
    ("/billing/v1/x/%2E%2E/y", 200, "allowed", "/api/v1/y"),
    # merged slashes cannot hide a denied path
    ("/billing/v1//admin/x", 403, "rule_denied", None),
    # ;parameters, backslashes and raw fragments are refused (Tomcat/Envoy/Istio bypasses)
    ("/billing/v1/admin;x=1/users", 400, "bad_request", None),
    ("/billing/v1\\admin", 400, "bad_request", None),
    # unreserved escapes are decoded before matching: %61dmin is admin
    ("/billing/v1/%61dmin/users", 403, "rule_denied", None),
    # a second Host header (request smuggling / routing confusion)
    ("/billing/v1/x HTTP/1.1\r\nHost: evil.example", 400, "bad_request", None),
]

# request heads (``%d``: the listener's port) that two parsers could frame differently, then a body
# that would smuggle a second request if one of them did
AMBIGUOUS_HEADS = [
    # CL.TE smuggling: both framings on one request
    b"POST /billing/v1/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n",
    # two Content-Length headers that disagree
    b"POST /billing/v1/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 2\r\nContent-Length: 40\r\n",
    # a lowercase method would dodge an uppercase methods: [...] rule and be re-uppercased by the client
    b"delete /billing/v1/admin/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n",
]

# (absolute-form target, Host, reason)
FORWARD_PROXY_TRICKS = [
    ("http://billing.internal@127.0.0.1/api/v1/x", "billing.internal@127.0.0.1", "bad_request"),  # userinfo
    ("http://billing.internal/api/v1/x", "evil.example", "host_mismatch"),  # Host disagrees with authority
    ("http://billing.internal/other/v1/x", "billing.internal", "unknown_upstream"),  # outside the base path
    ("http://billing.internal/api/../other", "billing.internal", "unknown_upstream"),  # dot segments out of it
    ("http://billing.internal/api/v1/%61dmin/users", "billing.internal", "rule_denied"),  # encoded unreserved
    ("http://billing.internal/api/v1/x//..//admin/users", "billing.internal", "rule_denied"),
]
