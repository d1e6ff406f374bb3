"""hmac_signing: vendor HMAC schemes declared in config reproduce the vendors' published worked examples,
and a recording upstream verifies, by each vendor's own recipe, the signature over what it received
(issue 14 items 3 and 6)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from multidict import CIMultiDict

from sidecar.credentials.base import OutboundRequest, ProviderDeps
from sidecar.credentials.hmac_signing import HmacSigningProvider
from tests.credentials.providers import config_errors, parse_spec
from tests.harness import Upstream

EXAMPLES = yaml.safe_load((Path(__file__).resolve().parents[2] / "config" / "hmac_signing.example.yaml").read_text())
AGENT = "spiffe://example.org/ns/agents/sa/trader"

# Binance Spot API documentation, "SIGNED Endpoint Examples for POST /api/v3/order", HMAC keys
# (https://developers.binance.com/docs/binance-spot-api-docs/rest-api/endpoint-security-type).
BINANCE = {
    "BINANCE_API_KEY": "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A",
    "BINANCE_API_SECRET": "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j",
}
BINANCE_TIMESTAMP_MS = 1499827319559
BINANCE_EXAMPLE_1 = "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"  # all parameters in the query
BINANCE_EXAMPLE_3 = "0fd168b8ddb4876a0358a8d14d0c9f3da0e9b20c5d52b2a00fcf7d1c602f9a77"  # query and body mixed

# Kraken Spot REST API documentation, "Authentication", the API-Sign worked example
# (https://docs.kraken.com/api/docs/guides/spot-rest-auth).
KRAKEN = {
    "KRAKEN_API_KEY": "kraken-example-api-key",
    "KRAKEN_PRIVATE_KEY": "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg==",
}
KRAKEN_PATH = "/0/private/AddOrder"
KRAKEN_BODY = b"nonce=1616492376594&ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25"
KRAKEN_API_SIGN = "4/dpxb3iT4tp/ZCVEwSnEsLxx0bqyhLpdfOpc6fn7OR8+UClSV5n9E6aSS8MPtnRfp32bAb0nmbRn6H8ndwLUQ=="


@pytest.fixture
def vendor_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The published example keys, where the example config reads them from."""
    for name, value in {**BINANCE, **KRAKEN}.items():
        monkeypatch.setenv(name, value)


def entry(name: str) -> dict[str, Any]:
    """The example config's entry for ``name``, without its ``type:`` (what a type's parser reads)."""
    return {k: v for k, v in EXAMPLES["credentials"][name].items() if k != "type"}


def vendor(name: str, *, now: float = BINANCE_TIMESTAMP_MS / 1000) -> HmacSigningProvider:
    """The provider the example config's entry builds, its clock fixed."""
    spec = parse_spec("hmac_signing", entry(name))
    return HmacSigningProvider(name, spec, ProviderDeps(agent_id=AGENT, id_key=b"k" * 32, clock=lambda: now))


def signed(provider: HmacSigningProvider, method: str, path: str, query: str = "", body: bytes | None = b"",
           headers: dict[str, str] | None = None) -> OutboundRequest:
    out = OutboundRequest(method, "https", "api.example.com", 443, path, query, CIMultiDict(headers or {}), body=body)
    provider.apply(out, provider._credential)
    return out


def test_binance_example_1_all_parameters_in_the_query(vendor_env: None) -> None:
    """The agent's query, the sidecar's millisecond timestamp appended, signed: the documented signature."""
    out = signed(vendor("binance"), "POST", "/api/v3/order",
                 "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000")
    assert out.query == ("symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000"
                         f"&timestamp={BINANCE_TIMESTAMP_MS}&signature={BINANCE_EXAMPLE_1}")
    assert out.headers["X-MBX-APIKEY"] == BINANCE["BINANCE_API_KEY"]


def test_binance_example_3_query_and_body_mixed(vendor_env: None) -> None:
    """The query followed by the body, no separator: with the timestamp the agent put in its body, the
    documented signature (the same entry without a timestamp of its own)."""
    raw = entry("binance")
    raw.pop("timestamp")
    spec = parse_spec("hmac_signing", raw)
    provider = HmacSigningProvider("binance", spec, ProviderDeps(agent_id=AGENT, id_key=b"k" * 32))
    out = signed(provider, "POST", "/api/v3/order", "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC",
                 b"quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559")
    assert out.query.endswith(f"&signature={BINANCE_EXAMPLE_3}")
    assert out.headers["Content-Length"] == "60"


def test_kraken_api_sign_worked_example(vendor_env: None) -> None:
    """URI path + SHA-256(nonce + POST data), HMAC-SHA512 with the decoded key, base64: the documented API-Sign."""
    out = signed(vendor("kraken"), "POST", KRAKEN_PATH, body=KRAKEN_BODY)
    assert out.headers["API-Sign"] == KRAKEN_API_SIGN
    assert out.headers["API-Key"] == KRAKEN["KRAKEN_API_KEY"]


def test_the_agents_own_signature_timestamp_and_key_id_never_reach_the_upstream(vendor_env: None) -> None:
    """Every header and query parameter the scheme writes is the sidecar's, written once."""
    out = signed(vendor("binance"), "GET", "/api/v3/account", "signature=forged&timestamp=1&a=1",
                 headers={"X-MBX-APIKEY": "agent-dummy"})
    assert out.query.startswith(f"a=1&timestamp={BINANCE_TIMESTAMP_MS}&signature=")
    assert out.query.count("signature=") == 1 and out.headers.getall("X-MBX-APIKEY") == [BINANCE["BINANCE_API_KEY"]]


GENERIC = {"key": {"value": "g" * 32}, "algorithm": "sha256", "encoding": "base64",
           "separator": "\n", "signature": {"header": "X-Signature", "scheme": "v1="},
           "timestamp": {"header": "X-Timestamp", "format": "iso8601"}, "nonce": {"query": "nonce"}}


@pytest.mark.parametrize("parts, expected", [
    (["method", "path", "query"], b"GET\n/v1/x\nb=2&a=1&nonce=N"),
    (["sorted_query"], b"a=1&b=2&nonce=N"),  # sorted by name, then value
    (["target", "host"], b"/v1/x?b=2&a=1&nonce=N\napi.example.com"),
    (["header:content-type", "header:x-absent"], b"text/plain\n"),  # an absent header is empty
    (["body", "body_hash"], b"hi\n" + hashlib.sha256(b"hi").hexdigest().encode()),
    (["timestamp", "nonce"], b"2017-07-12T02:41:59.559Z\nN"),
    (["literal:v1", "form:missing"], b"v1\n"),
    (["sha256(method, path)"], hashlib.sha256(b"GET/v1/x").digest()),  # a digest joins its parts without separator
])
def test_each_canonical_part_reads_the_request_as_sent(parts: list[str], expected: bytes,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The message signed is the declared parts joined by the separator, each read after every rewrite."""
    monkeypatch.setattr("secrets.token_hex", lambda n: "N")
    spec = parse_spec("hmac_signing", {**GENERIC, "canonical": parts})
    provider = HmacSigningProvider("g", spec, ProviderDeps(agent_id=AGENT, id_key=b"k" * 32,
                                                           clock=lambda: BINANCE_TIMESTAMP_MS / 1000))
    out = signed(provider, "GET", "/v1/x", "b=2&a=1", b"hi", {"Content-Type": "text/plain"})
    mac = base64.b64encode(hmac.new(b"g" * 32, expected, "sha256").digest()).decode()
    assert out.headers["X-Signature"] == f"v1={mac}"
    assert out.headers["X-Timestamp"] == "2017-07-12T02:41:59.559Z"


@pytest.mark.parametrize("change, error", [
    ({"algorithm": "md5"}, "credentials.test.algorithm: must be one of sha256, sha512"),
    ({"canonical": ["method", "url"]}, "credentials.test.canonical: 'url' is not a canonical part"),
    ({"canonical": ["sha256(sha256(body))"]}, "credentials.test.canonical: 'sha256(body)' is not a canonical part"),
    ({"signature": {"header": "X-Sig", "query": "sig"}},
     "credentials.test.signature: needs exactly one of header: NAME or query: NAME"),
    ({"signature": None}, "credentials.test.signature: is required"),
    ({"timestamp": {"header": "X-T", "format": "rfc1123"}},
     "credentials.test.timestamp.format: must be one of unix, unix_ms, iso8601"),
    ({"key": {"value": "short"}}, "credentials.test.key: must be a shared secret of at least 32 bytes for hmac-sha256"),
    ({"key_encoding": "hex", "key": {"value": "zz" * 32}}, "credentials.test.key: must be a shared secret in hex"),
    ({"key_id": {"header": "X-Key"}}, "credentials.test.key_id.value: is required"),
    ({"nonce": {"header": "X-N", "extra": 1}}, "credentials.test.nonce.extra: unknown key"),
])
def test_a_bad_entry_is_a_config_error_with_its_path(change: dict[str, Any], error: str) -> None:
    """Every problem of an entry is reported at load, each with its path."""
    raw = {k: v for k, v in ({**GENERIC, "canonical": ["method"], **change}).items() if v is not None}
    errors = config_errors("hmac_signing", raw)
    assert any(e.startswith(error) for e in errors), errors


def example_config(upstream: Upstream, name: str) -> dict[str, Any]:
    """The example file's entry for ``name``, its upstream the recording one."""
    return {"outbound": {"upstreams": {name: {"url": upstream.url, "hosts": [f"api.{name}.com"], "credential": name}}},
            "credentials": {name: EXAMPLES["credentials"][name]}}


def allow(name: str) -> dict[str, Any]:
    return {"version": 1, "default": "deny", "rules": [
        {"id": "all", "direction": "outbound", "upstream": name, "effect": "allow"}]}


async def test_binance_signature_verifies_over_what_the_upstream_received(make_sidecar, upstream, vendor_env):
    """Binance's recipe, applied by the recording upstream to the query and body it received, gives the
    signature it received; the agent's dummy key never arrives (issue 14 item 6)."""
    h = await make_sidecar(example_config(upstream, "binance"), allow("binance"))
    async with aiohttp.ClientSession() as s:
        async with s.post("http://api.binance.com/api/v3/order?symbol=LTCBTC&side=BUY", data=b"quantity=1&price=0.1",
                          headers={"X-MBX-APIKEY": "agent-dummy", "Content-Type": "application/x-www-form-urlencoded"},
                          proxy=h.outbound) as r:
            assert r.status == 200
    [seen] = upstream.seen
    query, _, signature = seen.path.partition("?")[2].rpartition("&signature=")
    secret = BINANCE["BINANCE_API_SECRET"].encode()
    assert signature == hmac.new(secret, query.encode() + seen.body, hashlib.sha256).hexdigest()
    assert seen.header("X-MBX-APIKEY") == BINANCE["BINANCE_API_KEY"]
    assert seen.header("Content-Length") == str(len(seen.body)) and seen.body == b"quantity=1&price=0.1"
    [event] = await h.settle()
    assert (event["credential"]["type"], event["credential"]["standing"]) == ("hmac_signing", True)
    assert BINANCE["BINANCE_API_SECRET"] not in h.raw_log().decode()


async def test_kraken_signature_verifies_over_what_the_upstream_received(make_sidecar, upstream, vendor_env):
    """Kraken's recipe over the path and body the upstream received, the body sent chunked by the agent and
    framed with a Content-Length by the sidecar, gives the API-Sign it received; one altered byte does not."""
    h = await make_sidecar(example_config(upstream, "kraken"), allow("kraken"))

    async def chunked():
        yield KRAKEN_BODY[:20]
        yield KRAKEN_BODY[20:]

    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://api.kraken.com{KRAKEN_PATH}", data=chunked(), proxy=h.outbound) as r:
            assert r.status == 200
    [seen] = upstream.seen
    assert seen.header("Content-Length") == str(len(KRAKEN_BODY)) and not seen.has_header("Transfer-Encoding")

    def api_sign(path: str, body: bytes) -> str:
        nonce = body.split(b"&")[0].partition(b"=")[2]
        key = base64.b64decode(KRAKEN["KRAKEN_PRIVATE_KEY"])
        message = path.encode() + hashlib.sha256(nonce + body).digest()
        return base64.b64encode(hmac.new(key, message, hashlib.sha512).digest()).decode()

    assert seen.header("API-Sign") == api_sign(seen.path, seen.body) == KRAKEN_API_SIGN
    assert seen.header("API-Sign") != api_sign(seen.path, seen.body.replace(b"1.25", b"1.26"))
