"""The outbound listener: routing, the trust boundary, header hygiene, credentials, errors."""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from dataclasses import replace
from datetime import datetime, timezone
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web

from sidecar.policy.engine import PolicySet
from sidecar.policy.ratelimit import RateLimiter
from tests.harness import OK, Upstream, open_outbound, raw_http, read_until
from tests.peers.apache import Apache as ApacheServer, apache  # noqa: F401
from tests.scenarios.http1_corpus import AMBIGUOUS_HEADS, BYPASS_TARGETS, FORWARD_PROXY_TRICKS
from tests.scenarios.outbound import ALLOW_ALL, POLICY, SECRET, config_for, outbound_to

async def test_route_prefix_forwards_to_base_path_with_the_credential(make_sidecar, upstream):
    """A route-prefix request reaches the upstream's base path with the static credential attached."""
    h = await make_sidecar(config_for(upstream), POLICY)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/billing/v1/invoices?x=1&y=%20", headers={"Authorization": "Bearer agent-own"}) as r:
            assert r.status == 200
            assert r.headers["Via"] == "1.1 sidecar"
    seen = upstream.seen[-1]
    assert seen.path == "/api/v1/invoices?x=1&y=%20"
    assert seen.header("X-API-Key") == SECRET
    assert not seen.has_header("Authorization")
    event = (await h.settle())[-1]
    assert event["decision"] == "allow" and event["rule_id"] == "read-invoices"
    assert event["credential"]["source"] == "static" and event["credential"]["standing"] is True
    assert event["target"]["path"] == "/v1/invoices" and event["outcome"] == "completed"


async def test_forward_proxy_mode_maps_hosts_and_strips_the_base_path(make_sidecar, upstream):
    """An absolute-URI request is mapped through hosts; rules see the path without the base path."""
    h = await make_sidecar(config_for(upstream), POLICY)
    async with aiohttp.ClientSession() as s:
        async with s.get("http://billing.internal/api/v1/x", proxy=h.outbound) as r:
            assert r.status == 200
    assert upstream.seen[-1].path == "/api/v1/x"
    event = (await h.settle())[-1]
    assert event["target"]["path"] == "/v1/x"


@pytest.mark.parametrize("target, headers, reason, status", [
    # an upstream that is not configured: never an open proxy
    ("/nowhere/v1/x", {}, "unknown_upstream", 403),
    # a page the agent's browser loaded (CORS / fetch metadata)
    ("/billing/v1/x", {"Origin": "https://evil.example"}, "browser_origin", 403),
    ("/billing/v1/x", {"Sec-Fetch-Site": "cross-site"}, "browser_origin", 403),
    # DNS rebinding: a route-prefix request whose Host is some other name
    ("/billing/v1/x", {"Host": "evil.example:17001"}, "host_mismatch", 403),
    # a rule denies it: deny wins
    ("/billing/v1/admin/users", {}, "rule_denied", 403),
    # no rule allows it
    ("/billing/v2/x", {}, "no_matching_rule", 403),
    # an encoded slash is refused unless the upstream allows it
    ("/billing/v1/a%2Fb", {}, "bad_request", 400),
    # underscore header names are refused (Envoy/nginx header smuggling)
    ("/billing/v1/x", {"X_Forwarded_User": "admin"}, "bad_request", 400),
])
async def test_refusals_carry_reason_status_and_forward_nothing(make_sidecar, upstream, target, headers, reason, status):
    """Each refusal answers with its status, a JSON reason and Proxy-Status, and the upstream sees nothing."""
    h = await make_sidecar(config_for(upstream), POLICY)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}{target}", headers=headers) as r:
            body = await r.json()
            assert (r.status, body["error"]) == (status, reason)
            assert f'details="{reason}"' in r.headers["Proxy-Status"]
    assert upstream.seen == []
    event = (await h.settle())[-1]
    assert event["reason"] == reason and event["decision"] == "deny" and event["status"] == status


async def test_a_defect_inside_an_exchange_is_one_internal_error_event_and_a_json_500(make_sidecar, upstream):
    """A stage that raises something other than a refusal fails closed: a JSON 500 without a traceback,
    nothing forwarded, exactly one event (it was two: the exchange's and the server's error hook)."""
    h = await make_sidecar(config_for(upstream), POLICY)

    class Broken:
        headers_read: frozenset[str] = frozenset()  # what the recorder reads of the policy in force

        def decide(self, *facts: object) -> None:
            raise RuntimeError("boom: a defect with a detail the agent must not read")

    h.sidecar.runtime.policies.current = Broken()  # type: ignore[assignment]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/billing/v1/invoices") as r:
            status, body = r.status, await r.text()
    assert (status, json.loads(body)["error"]) == (500, "internal_error")
    assert "boom" not in body and "Traceback" not in body
    assert upstream.seen == []
    events = await h.settle()
    assert [(e["reason"], e["outcome"], e["status"]) for e in events] == [("internal_error", "refused", 500)]
    # RuntimeError: the defect itself; TypeError: a compiled pipeline (SIDECAR_MYPYC) refuses the stand-in first
    assert events[0]["reason_detail"] in ("internal error (RuntimeError)", "internal error (TypeError)")
    assert b"boom" not in h.raw_log()


async def test_hop_by_hop_and_connection_listed_headers_never_reach_the_upstream(make_sidecar, upstream):
    """Hop-by-hop headers, and any header named in Connection, are removed (RFC 9110 7.6.1)."""
    h = await make_sidecar(config_for(upstream), POLICY)
    request = (b"GET /billing/v1/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: keep-alive, X-Secret-Hop\r\n"
               b"X-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic abc\r\n"
               b"X-Forwarded-For: 6.6.6.6\r\nCookie: session=1\r\nX-Kept: yes\r\nConnection: close\r\n\r\n"
               % h.port("outbound"))
    response = await raw_http(h.port("outbound"), request)
    assert response.startswith(b"HTTP/1.1 200")
    seen = upstream.seen[-1]
    for name in ("X-Secret-Hop", "Keep-Alive", "TE", "Proxy-Authorization", "X-Forwarded-For", "Cookie"):
        assert not seen.has_header(name), name
    assert seen.header("X-Kept") == "yes"


async def test_a_redirect_is_passed_back_not_followed(make_sidecar):
    """A 302 from the upstream reaches the agent as it is; the sidecar follows nothing."""
    async def redirect(request):
        from aiohttp import web
        return web.Response(status=302, headers={"Location": "https://elsewhere.example/"})

    up = await Upstream(redirect).start()
    try:
        h = await make_sidecar(config_for(up), POLICY)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/billing/v1/x", allow_redirects=False) as r:
                assert r.status == 302 and r.headers["Location"] == "https://elsewhere.example/"
        assert len(up.seen) == 1
    finally:
        await up.stop()


async def test_a_malformed_request_gets_json_bad_request_and_its_bytes_reach_no_log(make_sidecar, upstream):
    """A header with a control character is refused as JSON bad_request; its value is logged nowhere."""
    h = await make_sidecar(config_for(upstream), POLICY)
    leak = b"Bearer eyJsecret-token-canary-77"
    response = await raw_http(h.port("outbound"), b"GET /billing/v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: "
                              + leak + b"\x01\r\n\r\n")
    assert response.split(b" ")[1] == b"400"
    assert b'"error":"bad_request"' in response
    assert b"canary" not in response
    assert b"canary" not in h.raw_log()
    assert upstream.seen == []
    assert any(e["reason"] == "bad_request" for e in await h.settle())


async def test_header_limits_answer_431(make_sidecar, upstream):
    """More headers than the configured limit is 431 headers_too_large, not aiohttp's 400."""
    config = config_for(upstream)
    config["outbound"]["limits"] = {"max_headers": 10}
    h = await make_sidecar(config, POLICY)
    headers = {f"X-H{i}": "v" for i in range(15)}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/billing/v1/x", headers=headers) as r:
            assert r.status == 431 and (await r.json())["error"] == "headers_too_large"
    assert upstream.seen == []


async def test_body_limit_answers_413(make_sidecar, upstream):
    """A body over the configured limit is 413 body_too_large and is not forwarded."""
    config = config_for(upstream)
    config["outbound"]["limits"] = {"max_body_bytes": 1000}
    h = await make_sidecar(config, POLICY)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{h.outbound}/billing/v1/x", data=b"x" * 5000) as r:
            assert r.status == 413 and (await r.json())["error"] == "body_too_large"
    assert upstream.seen == []


async def test_unreachable_upstream_is_502(make_sidecar, unused_tcp_port):
    """A refused connection to the upstream is 502 upstream_unreachable."""
    dead = Upstream()
    dead.port = unused_tcp_port
    h = await make_sidecar(config_for(dead), POLICY)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/billing/v1/x") as r:
            assert r.status == 502 and (await r.json())["error"] == "upstream_unreachable"
            assert "connection_refused" in r.headers["Proxy-Status"]


async def test_slow_upstream_is_504(make_sidecar):
    """An upstream that does not answer within first_byte is 504 upstream_timeout."""
    import asyncio

    async def slow(request):
        await asyncio.sleep(5)
        from aiohttp import web
        return web.Response()

    up = await Upstream(slow).start()
    try:
        h = await make_sidecar(config_for(up, timeouts={"first_byte": "200ms"}), POLICY)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/billing/v1/x") as r:
                assert r.status == 504 and (await r.json())["error"] == "upstream_timeout"
    finally:
        await up.stop()


@pytest.mark.parametrize("raw_target, status, reason, forwarded", BYPASS_TARGETS)
async def test_what_is_matched_is_what_is_forwarded(make_sidecar, upstream, raw_target, status, reason, forwarded):
    """Bypass inputs are refused or matched on their canonical form, which is exactly what is forwarded."""
    h = await make_sidecar(config_for(upstream), POLICY)
    port = h.port("outbound")
    response = await raw_http(port, f"GET {raw_target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                    "Connection: close\r\n\r\n".encode())
    assert response.split(b" ")[1] == str(status).encode()
    event = (await h.settle())[-1]
    assert event["reason"] == reason
    if forwarded is None:
        assert upstream.seen == []
    else:
        assert [s.path for s in upstream.seen] == [forwarded]


async def test_a_chunked_body_over_the_limit_is_cut_at_the_limit(make_sidecar):
    """A chunked upload with no declared length is refused with 413 once it passes the limit."""
    from aiohttp import web

    async def sink(request):
        await request.read()
        return web.Response(text="read")

    async def chunks():
        for _ in range(10):
            yield b"y" * 1000

    up = await Upstream(sink).start()
    try:
        config = config_for(up)
        config["outbound"]["limits"] = {"max_body_bytes": 2500}
        h = await make_sidecar(config, POLICY)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{h.outbound}/billing/v1/upload", data=chunks()) as r:
                assert r.status == 413 and (await r.json())["error"] == "body_too_large"
        assert (await h.settle())[-1]["reason"] == "body_too_large"
    finally:
        await up.stop()


async def test_no_response_names_the_sidecars_stack(make_sidecar):
    """A refusal, and a forwarded response whose upstream sent no Server, never say 'Python/… aiohttp/…'."""
    async def bare_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(bare_upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        h = await make_sidecar({"outbound": {"upstreams": {"bare": {"url": f"http://127.0.0.1:{port}"}}}},
                               {"version": 1, "default": "deny", "rules": [
                                   {"id": "all", "direction": "outbound", "upstream": "bare", "effect": "allow"}]})
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/bare/x") as forwarded:
                assert forwarded.status == 200
                assert forwarded.headers.get("Server") == "sidecar"
            async with s.get(f"{h.outbound}/nope/x") as refused:
                assert refused.status == 403
                assert refused.headers.get("Server") == "sidecar"
    finally:
        server.close()


# -- secrets that must not come back, or reach the wrong upstream (issue 11 items 4, 5, 6) ------

ODD_SECRET = "canary/static+secret=9f3a7c"  # percent-encoded in a query: canary%2Fstatic%2Bsecret%3D9f3a7c
CREDENTIALS = {"as-header": {"type": "static", "header": "X-API-Key", "value": {"value": ODD_SECRET}},
               "as-query": {"type": "static", "query": "api_key", "value": {"value": ODD_SECRET}}}
ANY_METHOD = {"version": 1, "default": "deny", "rules": [  # no methods: any verb, TRACE included
    {"id": "apache-all", "direction": "outbound", "upstream": "apache", "paths": ["/v1/**"], "effect": "allow"}]}


def apache_config(apache: ApacheServer, credential: str, **upstream: object) -> dict:
    return {"outbound": {"upstreams": {"apache": {"url": apache.url, "credential": credential, **upstream}}},
            "credentials": CREDENTIALS}


def leaks(text: str) -> bool:
    """The secret in text: raw, or percent-encoded in either case."""
    encoded = quote(ODD_SECRET, safe="")
    return ODD_SECRET in text or encoded.lower() in text.lower()


async def whole_response(s: aiohttp.ClientSession, method: str, url: str) -> tuple[int, str, str]:
    async with s.request(method, url, allow_redirects=False) as r:
        return r.status, "\n".join(f"{k}: {v}" for k, v in r.headers.items()), await r.text()


@pytest.mark.peer("apache")
async def test_trace_is_refused_before_it_can_echo_the_credential(make_sidecar, apache):
    """TRACE, which Apache answers with the request it received, reaches no upstream by default (issue 11 item 4)."""
    h = await make_sidecar(apache_config(apache, "as-header"), ANY_METHOD)
    async with aiohttp.ClientSession() as s:
        status, head, body = await whole_response(s, "TRACE", f"{h.outbound}/apache/v1/x")
    assert (status, json.loads(body)["error"]) == (405, "method_not_allowed")
    assert "allow_trace" in json.loads(body)["message"] and 'details="method_not_allowed"' in head
    assert apache.requests() == [] and not leaks(head + body)
    [event] = await h.settle()
    assert (event["reason"], event["status"], event["target"]["method"]) == ("method_not_allowed", 405, "TRACE")
    assert event["credential"] is None


@pytest.mark.peer("apache")
@pytest.mark.parametrize("credential", ["as-header", "as-query"])
async def test_an_upstream_that_allows_trace_gets_it_without_a_credential(make_sidecar, apache, credential):
    """allow_trace forwards TRACE to Apache, whose echo then holds no credential to hand back (issue 11 item 4)."""
    h = await make_sidecar(apache_config(apache, credential, allow_trace=True), ANY_METHOD)
    async with aiohttp.ClientSession() as s:
        status, head, body = await whole_response(s, "TRACE", f"{h.outbound}/apache/v1/x?page=2")
    assert status == 200 and "message/http" in head
    assert body.startswith("TRACE /v1/x?page=2 HTTP/1.1") and "Via: 1.1 sidecar" in body
    assert not leaks(head + body) and apache.requests(1) == ["TRACE /v1/x?page=2"]
    [event] = await h.settle()
    assert (event["decision"], event["credential"], event["outcome"]) == ("allow", None, "completed")


@pytest.mark.peer("apache")
@pytest.mark.parametrize("credential, target, header, cleaned", [
    # Apache's DirectorySlash: /v1/files -> /v1/files/ with the query kept, credential and all
    ("as-query", "/v1/files?x=1", "Location", r"http://127\.0\.0\.1:\d+/v1/files/\?x=1$"),
    # URLs repeated in Link, Content-Location and Refresh: the parameter goes, the rest stays
    ("as-query", "/v1/page?x=1", "Link", r'^</v1/page\?x=1>; rel="next"$'),
    ("as-query", "/v1/page?x=1", "Content-Location", r"^/v1/page\?x=1$"),
    ("as-query", "/v1/page?x=1", "Refresh", r"^0; url=/v1/page\?x=1$"),
    # a header credential that Apache's "Header always echo" repeats: that header goes
    ("as-header", "/v1/files?x=1", "X-API-Key", None),
    ("as-header", "/v1/page", "X-API-Key", None),
])
async def test_response_headers_never_hand_back_the_attached_credential(make_sidecar, apache, credential, target,
                                                                         header, cleaned):
    """What Apache echoes of the attached credential leaves the headers, and the event says so (issue 11 item 5)."""
    h = await make_sidecar(apache_config(apache, credential), ANY_METHOD)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/apache{target}", allow_redirects=False) as r:
            head, body = r.headers, await r.text()
    assert not leaks("\n".join(f"{k}: {v}" for k, v in head.items()) + body)
    if cleaned is None:
        assert header not in head
    else:
        assert re.search(cleaned, head[header]), head[header]
    if head.get("Location"):  # a redirect's body repeats its URL for humans: it is not relayed
        assert body == "" and head["Content-Length"] == "0"
    [sent] = apache.requests(1)
    assert leaks(sent) if credential == "as-query" else not leaks(sent)  # it was attached, and only there
    [event] = await h.settle()
    assert event["decision"] == "allow" and event["outcome"] == "completed"
    done = "dropped" if cleaned is None else "query parameter removed"
    assert f"{header.lower()}: {done}" in event["reason_detail"]
    assert not leaks(json.dumps(event))


SESSION_TOKEN = "FwoGZXIvYXdzE/session+token=canary"  # an STS session token's alphabet: base64, / + =
AWS_STATIC = {"type": "aws_sigv4", "region": "us-east-1", "service": "s3", "source": {
    "type": "static", "access_key_id": {"value": "ASIASIDECAR"}, "secret_access_key": {"value": "aws-secret-canary"},
    "session_token": {"value": SESSION_TOKEN}}}


@pytest.mark.peer("apache")
@pytest.mark.parametrize("credential, secret", [
    # a header credential an error page repeats
    ("as-header", ODD_SECRET),
    # S3's SignatureDoesNotMatch repeats the canonical request: the session token the sidecar signed with
    ("aws", SESSION_TOKEN),
])
async def test_an_error_body_never_hands_back_the_attached_credential(make_sidecar, apache, credential, secret):
    """A short body that repeats the attached secret reaches the agent with <redacted> in its place, the
    rest of the error intact, and the event says so; the upstream did get it (issue 14: S3's error echo)."""
    cfg = apache_config(apache, credential)
    cfg["credentials"] = {**CREDENTIALS, "aws": AWS_STATIC}
    h = await make_sidecar(cfg, ANY_METHOD)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/apache/v1/error") as r:
            status, head, body = r.status, r.headers, await r.text()
    assert status == 403 and "<Code>SignatureDoesNotMatch</Code>" in body
    header = "x-amz-security-token" if credential == "aws" else "x-api-key"
    assert f"{header}:<redacted>" in body and int(head["Content-Length"]) == len(body.encode())
    assert secret not in body and quote(secret, safe="") not in body
    assert not any(secret in value for value in head.values())
    assert apache.requests(1) == ["GET /v1/error"]
    [event] = await h.settle()
    assert (event["decision"], event["status"], event["outcome"]) == ("allow", 403, "completed")
    assert "response body echoed the attached credential: replaced" in event["reason_detail"]
    assert secret not in json.dumps(event)


def echoing(status: int, *, chunked: bool = False, gzip: bool = False, pad: int = 0):
    """An upstream handler whose answer repeats the X-API-Key it received, as error pages and debug
    endpoints do: framed by Content-Length, chunked in two writes, or gzip-encoded; ``pad`` bytes more."""
    async def handler(request: web.Request) -> web.StreamResponse:
        body = json.dumps({"error": "denied", "received": {"x-api-key": request.headers.get("X-API-Key")},
                           "pad": "p" * pad}).encode()
        if gzip:
            return web.Response(status=status, body=zlib.compress(body, wbits=16 + zlib.MAX_WBITS),
                                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        if not chunked:
            return web.Response(status=status, body=body, content_type="application/json")
        response = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(body[:20])
        await response.write(body[20:])
        await response.write_eof()
        return response
    return handler


@pytest.mark.parametrize("status, framing", [
    (400, {}),                          # Content-Length framed
    (403, {"chunked": True}),           # chunked: held up to 64 KiB to be searched whole
    (500, {"gzip": True}),              # gzip-encoded: decoded to look, sent decoded
    (200, {}),                          # a debug endpoint's short 200 that prints its headers
])
async def test_a_short_answer_never_hands_back_the_attached_credential(make_sidecar, status, framing):
    """Every framing of a short answer is searched whole: the agent gets <redacted>, valid JSON, a right length."""
    upstream = await Upstream(echoing(status, **framing)).start()
    try:
        h = await make_sidecar({"outbound": {"upstreams": {"billing": {"url": upstream.url, "credential": "as-header"}}},
                                "credentials": CREDENTIALS}, ALLOW_ALL)
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.get(f"{h.outbound}/billing/v1/x") as r:
                status_, head, raw = r.status, r.headers, await r.read()
        assert status_ == status and "Content-Encoding" not in head and int(head["Content-Length"]) == len(raw)
        assert json.loads(raw)["received"] == {"x-api-key": "<redacted>"} and not leaks(raw.decode())
        [event] = await h.settle()
        assert "response body echoed the attached credential: replaced" in event["reason_detail"]
    finally:
        await upstream.stop()


async def test_a_long_error_answer_is_relayed_whole_and_unsearched(make_sidecar):
    """Past 64 KiB an unframed error answer is the upstream's data: streamed on from what was held, not a byte lost."""
    upstream = await Upstream(echoing(502, chunked=True, pad=100_000)).start()
    try:
        h = await make_sidecar({"outbound": {"upstreams": {"billing": {"url": upstream.url, "credential": "as-header"}}},
                                "credentials": CREDENTIALS}, ALLOW_ALL)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/billing/v1/x") as r:
                status, body = r.status, await r.json()
        assert status == 502 and body["pad"] == "p" * 100_000
        [event] = await h.settle()
        assert event["outcome"] == "completed" and "body echoed" not in (event["reason_detail"] or "")
    finally:
        await upstream.stop()


def two_upstreams(upstream: Upstream, other: Upstream) -> dict:
    return {"outbound": {"upstreams": {"billing": {"url": upstream.url, "credential": "legacy"},
                                       "third-party": {"url": other.url}}},
            "credentials": {"legacy": {"type": "static", "header": "X-API-Key", "value": {"value": SECRET}}}}


async def test_a_credential_never_reaches_an_upstream_it_is_not_configured_for(make_sidecar, upstream):
    """Should a rule without upstream slip past the loader, its credential still goes nowhere else (issue 11 item 6)."""
    other = await Upstream().start()
    try:
        h = await make_sidecar(two_upstreams(upstream, other), {"version": 1, "default": "deny", "rules": [
            {"id": "billing-key", "direction": "outbound", "upstream": "billing", "credential": "legacy",
             "effect": "allow"}]})
        runtime = h.sidecar.runtime
        loaded = runtime.policy
        everywhere = replace(loaded.rules[0], upstream=None)  # what the loader now refuses
        runtime.policies.current = PolicySet([everywhere], default="deny", version="v-any", mode="enforce", files=[],
                                            limiter=RateLimiter(), clock=lambda: datetime.now(timezone.utc))
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{h.outbound}/third-party/v1/x") as r:
                status, body = r.status, await r.json()
            async with s.get(f"{h.outbound}/billing/v1/x") as ok:
                assert ok.status == 200
        assert (status, body["error"]) == (503, "credential_unavailable")
        assert "legacy is not configured for upstream third-party" in body["message"]
        assert other.seen == [] and upstream.seen[-1].header("X-API-Key") == SECRET
        refused, allowed = await h.settle()
        assert (refused["reason"], refused["target"]["upstream"], refused["credential"]) == (
            "credential_unavailable", "third-party", None)
        assert allowed["decision"] == "allow" and SECRET not in h.raw_log().decode()
    finally:
        await other.stop()


# -- what is matched is what is forwarded: overrides, headers, spellings, smuggled identity (issue 11) --

OVERRIDE_POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "write-invoices", "direction": "outbound", "upstream": "billing", "methods": ["GET", "POST"],
     "paths": ["/v1/**"], "effect": "allow"},
    {"id": "no-deletes", "direction": "outbound", "upstream": "billing", "methods": ["DELETE"], "effect": "deny"},
    {"id": "no-admin", "direction": "outbound", "upstream": "billing", "paths": ["/v1/admin/**"], "effect": "deny"},
]}


async def post(h, target: str, **kwargs: object) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{h.outbound}{target}", **kwargs) as r:
            return r.status, await r.json(content_type=None)


def refused_once(events: list[dict], reason: str) -> dict:
    """The one trust-decision event of a refused exchange."""
    assert len(events) == 1 and events[0]["reason"] == reason and events[0]["outcome"] == "refused"
    return events[0]


@pytest.mark.parametrize("target, kwargs, named", [
    # header overrides that Symfony, Laravel, Express method-override and Google APIs honour
    ("/billing/v1/x", {"headers": {"X-HTTP-Method-Override": "DELETE"}}, "X-HTTP-Method-Override"),
    ("/billing/v1/x", {"headers": {"X-HTTP-Method": "DELETE"}}, "X-HTTP-Method"),
    ("/billing/v1/x", {"headers": {"X-Method-Override": "DELETE"}}, "X-Method-Override"),
    # path overrides (IIS URL Rewrite, Symfony): the upstream serves another path than policy saw
    ("/billing/v1/x", {"headers": {"X-Original-URL": "/api/v1/admin/users"}}, "X-Original-URL"),
    ("/billing/v1/x", {"headers": {"X-Rewrite-URL": "/api/v1/admin/users"}}, "X-Rewrite-URL"),
    # the _method parameter, in the query or in a form body, also percent-encoded
    ("/billing/v1/x?_method=DELETE", {}, "_method query"),
    ("/billing/v1/x?%5Fmethod=DELETE", {}, "_method query"),
    ("/billing/v1/x", {"data": {"_method": "DELETE", "id": "7"}}, "_method form"),
])
async def test_method_and_url_overrides_are_refused_unless_passed(make_sidecar, upstream, target, kwargs, named):
    """An override that turns an allowed POST into another request is refused with request_override,
    naming the header or field, and nothing is forwarded (issue 11 item 9)."""
    h = await make_sidecar(config_for(upstream), OVERRIDE_POLICY)
    status, body = await post(h, target, **kwargs)
    assert (status, body["error"]) == (400, "request_override")
    assert named in body["message"] and "DELETE" not in body["message"]
    assert upstream.seen == []
    refused_once(await h.settle(), "request_override")


@pytest.mark.parametrize("headers, target, status, reason, override", [
    # the overriding method is denied: refused although POST alone is allowed
    ({"X-HTTP-Method-Override": "delete"}, "/billing/v1/x", 403, "rule_denied", {"method": "DELETE", "path": None}),
    # the overriding path is denied
    ({"X-Original-URL": "/api/v1/admin/users"}, "/billing/v1/x", 403, "rule_denied",
     {"method": None, "path": "/v1/admin/users"}),
    # both readings allowed: forwarded with the header, the event names the override
    ({"X-HTTP-Method-Override": "GET"}, "/billing/v1/x", 200, "allowed", {"method": "GET", "path": None}),
    # two overrides that disagree are ambiguous: which one the upstream honours is unknown
    ({"X-HTTP-Method-Override": "GET", "X-HTTP-Method": "DELETE"}, "/billing/v1/x", 400, "request_override", None),
])
async def test_a_passed_override_is_decided_as_both_requests(make_sidecar, upstream, headers, target, status,
                                                             reason, override):
    """With the override in pass_headers, policy must allow the request as sent and as overridden;
    the event records both (issue 11 item 9)."""
    passed = ["x-http-method-override", "x-http-method", "x-original-url"]
    h = await make_sidecar(config_for(upstream, pass_headers=passed), OVERRIDE_POLICY)
    got, body = await post(h, target, headers=headers)
    event = (await h.settle())[-1]
    assert (got, event["reason"]) == (status, reason)
    assert event["target"]["method"] == "POST" and event["target"]["override"] == override
    if status == 200:
        assert [s.header("X-HTTP-Method-Override") for s in upstream.seen] == ["GET"]
    else:
        assert body["error"] == reason and upstream.seen == []


DRY_RUN_POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "delete-only-as-dry-run", "direction": "outbound", "upstream": "billing", "methods": ["DELETE"],
     "headers": {"x-dry-run": ["true"]}, "effect": "allow"},
    {"id": "delete-only-as-dry-run-cel", "direction": "outbound", "upstream": "billing", "methods": ["PUT"],
     "when": {"expr": '"x-dry-run" in request.headers'}, "effect": "allow"},
]}


@pytest.mark.parametrize("method, rule", [("DELETE", "headers"), ("PUT", "expr")])
async def test_header_conditions_see_only_headers_that_are_forwarded(make_sidecar, upstream, method, rule):
    """A header named in Connection is not forwarded, so it cannot satisfy a header condition or a
    CEL request.headers test (issue 11 item 10)."""
    h = await make_sidecar(config_for(upstream), DRY_RUN_POLICY)
    port = h.port("outbound")
    head = (f"{method} /billing/v1/invoices/7 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Dry-Run: true\r\n"
            "Connection: close, X-Dry-Run\r\n\r\n")
    response = await raw_http(port, head.encode())
    assert response.split(b" ")[1] == b"403" and b'"error":"no_matching_rule"' in response
    assert upstream.seen == []
    refused_once(await h.settle(), "no_matching_rule")
    # the same request with the header forwarded is allowed, and the upstream receives it
    async with aiohttp.ClientSession() as s:
        async with s.request(method, f"{h.outbound}/billing/v1/invoices/7", headers={"X-Dry-Run": "true"}) as r:
            assert r.status == 200
    assert [s.header("X-Dry-Run") for s in upstream.seen] == ["true"]


SPELLING_POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "all", "direction": "outbound", "upstream": "billing", "effect": "allow"},
    {"id": "no-eu", "direction": "outbound", "upstream": "billing", "headers": {"x-region": ["EU"]},
     "effect": "deny"},
    {"id": "no-admin", "direction": "outbound", "upstream": "billing", "paths": ["/v1/admin"], "effect": "deny"},
]}


@pytest.mark.parametrize("raw_target, headers", [
    ("/billing/v1/x", "X-Region: US, EU\r\n"),        # one field, two values (RFC 9110 §5.3)
    ("/billing/v1/x", 'X-Region: "EU"\r\n'),          # a quoted-string element
    ("/billing/v1/x", "X-Region: US\r\nX-Region: ,EU\r\n"),  # repeated, with an empty element
    ("/billing/v1/admin/", ""),                        # a trailing slash names the same resource
    ("/billing/v1//admin/", ""),                       # merged slashes, then the trailing slash
    ("/billing/v1/%61dmin/", ""),                      # an unreserved escape, then the trailing slash
])
async def test_deny_rules_match_every_equivalent_spelling(make_sidecar, upstream, raw_target, headers):
    """A deny on x-region EU or on /v1/admin also matches the spellings an upstream reads the same way
    (issue 11 item 11)."""
    h = await make_sidecar(config_for(upstream), SPELLING_POLICY)
    port = h.port("outbound")
    response = await raw_http(port, f"GET {raw_target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}"
                                    "Connection: close\r\n\r\n".encode())
    assert response.split(b" ")[1] == b"403" and b'"error":"rule_denied"' in response
    assert upstream.seen == []
    assert refused_once(await h.settle(), "rule_denied")["rule_id"] in ("no-eu", "no-admin")


@pytest.mark.parametrize("target, kwargs, where", [
    ("/billing/v1/x?access_token=agent-own-token-canary", {}, "query"),       # RFC 6750 §2.3
    ("/billing/v1/x?a=1&access%5Ftoken=agent-own-token-canary", {}, "query"),  # percent-encoded name
    ("/billing/v1/x", {"data": {"access_token": "agent-own-token-canary"}}, "form"),  # RFC 6750 §2.2
])
async def test_an_access_token_parameter_is_refused(make_sidecar, upstream, target, kwargs, where):
    """The agent's own bearer token in a query or form parameter is refused with credential_parameter,
    and the token reaches neither the upstream, the response nor the log (issue 11 item 12)."""
    h = await make_sidecar(config_for(upstream), OVERRIDE_POLICY)
    status, body = await post(h, target, **kwargs)
    assert (status, body["error"]) == (400, "credential_parameter")
    assert f"access_token {where}" in body["message"] and "canary" not in json.dumps(body)
    assert upstream.seen == []
    refused_once(await h.settle(), "credential_parameter")
    assert b"canary" not in h.raw_log()


IDENTITY = {"X-Forwarded-User": "admin", "X-Forwarded-Email": "admin@example.com", "X-Forwarded-Groups": "admins",
            "X-Forwarded-Preferred-Username": "admin", "X-Remote-User": "admin", "X-Remote-Group": "admins",
            "X-Auth-Request-Email": "admin@example.com", "Remote-User": "admin"}


async def test_identity_headers_never_reach_the_upstream_unless_passed(make_sidecar, upstream):
    """Headers that upstreams trust from a fronting proxy to say who the user is are stripped; an
    upstream's pass_headers lets one through (issue 11 item 12)."""
    h = await make_sidecar(config_for(upstream, pass_headers=["x-auth-request-email"]), OVERRIDE_POLICY)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/billing/v1/x", headers=IDENTITY) as r:
            assert r.status == 200
    seen = upstream.seen[-1]
    assert [name for name in IDENTITY if seen.has_header(name)] == ["X-Auth-Request-Email"]


async def test_a_chunked_body_cannot_evade_a_request_size_condition(make_sidecar, upstream):
    """A rule limited by request.size must not let a chunked (length-less) body of any size through
    (security review 1, finding F3)."""
    policy = {"version": 1, "default": "deny", "rules": [
        {"id": "small-posts", "direction": "outbound", "upstream": "billing", "methods": ["POST"],
         "paths": ["/v1/**"], "when": {"expr": "request.size < 100"}, "effect": "allow"},
    ]}
    h = await make_sidecar(config_for(upstream), policy)
    big = b"x" * 5000

    async def chunks():
        yield big

    async with aiohttp.ClientSession() as s:
        async with s.post(f"{h.outbound}/billing/v1/upload", data=b"y" * 5000) as r:
            assert r.status == 403  # the declared length is checked
        async with s.post(f"{h.outbound}/billing/v1/upload", data=chunks()) as r:
            status = r.status
    delivered = [len(seen.body) for seen in upstream.seen]
    assert status == 403 and delivered == [], f"status {status}; upstream received bodies of {delivered} bytes"


@pytest.mark.parametrize("head", AMBIGUOUS_HEADS)
async def test_ambiguous_framing_and_methods_are_refused_before_anything_is_forwarded(make_sidecar, upstream, head):
    """Requests whose framing or method two parsers could read differently are refused with 400
    (security review 1: a defence that held)."""
    h = await make_sidecar(config_for(upstream), POLICY)
    port = h.port("outbound")
    smuggled = b"ab" + b"GET /api/v1/admin/users HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)
    response = await raw_http(port, (head % port) + b"Connection: close\r\n\r\n" + body)
    assert response.startswith(b"HTTP/1.0 400") or response.startswith(b"HTTP/1.1 400")
    assert upstream.seen == []


async def test_a_transfer_coding_other_than_chunked_is_refused_not_half_forwarded(make_sidecar, upstream):
    """Transfer-Encoding: gzip, chunked is refused with 400 rather than forwarded without its body
    (security review 1: a defence that held)."""
    h = await make_sidecar(config_for(upstream), POLICY)
    port = h.port("outbound")
    response = await raw_http(port, (f"POST /billing/v1/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                     "Transfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n"
                                     "5\r\nhello\r\n0\r\n\r\n").encode())
    assert response.split(b" ")[1] == b"400"
    assert upstream.seen == []


@pytest.mark.parametrize("target, host, reason", FORWARD_PROXY_TRICKS)
async def test_forward_proxy_tricks_are_refused(make_sidecar, upstream, target, host, reason):
    """Absolute-URI tricks (userinfo, Host mismatch, base-path escape, encodings) never reach the upstream
    (security review 1: a defence that held)."""
    h = await make_sidecar(config_for(upstream), POLICY)
    port = h.port("outbound")
    request = b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (target.encode(), host.encode())
    response = await raw_http(port, request)
    assert f'"error":"{reason}"'.encode() in response.replace(b'": "', b'":"')
    assert upstream.seen == []


async def test_agent_credentials_and_task_header_never_reach_the_upstream(make_sidecar, upstream):
    """Authorization, Cookie, Proxy-Authorization and X-Sidecar-Task from the agent are stripped or refused
    (security review 1: a defence that held)."""
    h = await make_sidecar(config_for(upstream), POLICY)
    headers = {"Authorization": "Bearer agent-own", "Cookie": "s=1", "Proxy-Authorization": "Basic eDp5",
               "X-API-Key": "agent-chosen-key"}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{h.outbound}/billing/v1/x", headers=headers) as r:
            assert r.status == 200
        async with s.get(f"{h.outbound}/billing/v1/x", headers={"X-Sidecar-Task": "forged"}) as r:
            assert r.status == 403 and (await r.json())["error"] == "unknown_task"
    assert len(upstream.seen) == 1
    seen = upstream.seen[0]
    for name in ("Authorization", "Cookie", "Proxy-Authorization", "X-Sidecar-Task"):
        assert not seen.has_header(name), name
    assert [v for k, v in seen.headers if k.lower() == "x-api-key"] == [SECRET]


async def test_an_agent_waiting_for_100_continue_gets_it_and_the_expectation_is_not_forwarded(
        make_sidecar, raw_server):
    """An agent that sends ``Expect: 100-continue`` and waits for the interim answer before its body
    (curl, .NET, Java clients) gets ``100 Continue`` once the request is allowed, instead of stalling;
    the sidecar answers the expectation itself and the upstream gets the body without it
    (security review 4, finding I3)."""
    heads: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        heads.append(await reader.readexactly(5))
        writer.write(OK)

    h = await make_sidecar(outbound_to(await raw_server(upstream)), ALLOW_ALL)
    reader, writer = await open_outbound(h, b"POST /billing/up HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                            b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert await read_until(reader, b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    final = await read_until(reader, b"ok")
    writer.close()
    assert final.startswith(b"HTTP/1.1 200 OK\r\n")
    assert heads[1] == b"hello" and b"expect:" not in heads[0].lower()


async def test_a_refused_request_with_expect_gets_its_refusal_and_no_100_continue(make_sidecar, raw_server):
    """A request policy refuses is answered with its 403 at once, never with ``100 Continue`` first, so
    that the agent does not send a body nobody will read (security review 4: a regression that held)."""
    h = await make_sidecar(outbound_to(await raw_server(lambda r, w: asyncio.sleep(0))),
                           {"version": 1, "default": "deny", "rules": []})
    reader, writer = await open_outbound(h, b"POST /billing/up HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                            b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    head = await read_until(reader, b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 403 ")
