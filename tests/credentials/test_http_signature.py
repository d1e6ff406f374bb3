"""http_signature: RFC 9421 signatures that reproduce the RFC's Appendix B vectors, and that the independent
http-message-signatures package verifies over the bytes a recording upstream received, for every algorithm
(issue 14 items 2 and 6)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from http_message_signatures import HTTPMessageVerifier, HTTPSignatureKeyResolver, InvalidSignature, algorithms
from multidict import CIMultiDict

from sidecar.credentials import http_signature
from sidecar.credentials.base import CredentialRequest, OutboundRequest, ProviderDeps
from sidecar.credentials.rfc9421 import signature_base, signature_params, verify_with
from tests.credentials.providers import config_errors, parse_spec
from tests.harness import Seen, Upstream, raw_http

VECTORS = Path(__file__).parent / "vectors" / "rfc9421"
B2 = json.loads((VECTORS / "b2.json").read_text())
CASES = {case["section"]: case for case in B2["cases"]}
REQUEST_CASES = [section for section, case in CASES.items() if case["message"] == "test-request"]
DETERMINISTIC = {"hmac-sha256", "ed25519"}
AGENT = "spiffe://example.org/ns/agents/sa/billing"
SHARED_SECRET = (VECTORS / "test-shared-secret.b64").read_text().strip()


def key_file(name: str) -> Path:
    return VECTORS / (f"{name}.b64" if name == "test-shared-secret" else f"{name}.pem")


def public_key(name: str) -> Any:
    """The verification key of an RFC test key (the shared secret's bytes for HMAC)."""
    if name == "test-shared-secret":
        return base64.b64decode(SHARED_SECRET)
    return serialization.load_pem_public_key((VECTORS / f"{name}.pub.pem").read_bytes())


def provider_for(raw: dict[str, Any], now: float = 1618884473) -> Any:
    spec = parse_spec("http_signature", {"algorithm": "ed25519", "key": {"from_file": str(key_file("test-key-ed25519"))},
                                       **raw})
    return http_signature.HttpSignatureProvider("test", spec, ProviderDeps(agent_id=AGENT, id_key=b"k" * 32, clock=lambda: now))


def rfc_request() -> OutboundRequest:
    """The RFC's test-request, as the sidecar would write it to https://example.com."""
    message = B2["test-request"]
    path, _, query = message["target"].partition("?")
    return OutboundRequest(message["method"], message["scheme"], "example.com", 443, path, query,
                           CIMultiDict(message["headers"]), body=message["body"].encode())


def signature_of(header: str, label: str) -> bytes:
    """The raw signature bytes of one label of a Signature field (``label=:base64:``)."""
    prefix = f"{label}=:"
    assert header.startswith(prefix) and header.endswith(":"), header
    return base64.b64decode(header[len(prefix):-1])


def vector_config(case: dict[str, Any]) -> dict[str, Any]:
    params = dict(case["params"])
    raw: dict[str, Any] = {"algorithm": case["algorithm"], "key": {"from_file": str(key_file(case["key"]))},
                           "label": case["label"], "components": case["components"], "keyid": params["keyid"],
                           "nonce": "nonce" in params}
    if "tag" in params:
        raw["tag"] = params["tag"]
    if "content-digest" in case["components"]:
        raw["content_digest"] = "sha-512"  # the test-request's Content-Digest
    return raw


# --- RFC 9421 Appendix B ---------------------------------------------------------------


@pytest.mark.parametrize("section", REQUEST_CASES)
async def test_the_rfc_request_vectors_are_signed_over_the_rfcs_signature_base(section, monkeypatch):
    """The sidecar signs the RFC's test-request with the RFC's Signature-Input over exactly the RFC's signature
    base, the RFC's own signature verifies over it, and deterministic algorithms reproduce it (issue 14 item 2)."""
    case = CASES[section]
    nonce = dict(case["params"]).get("nonce")
    monkeypatch.setattr(http_signature.secrets, "token_urlsafe", lambda _: nonce)
    provider = provider_for(vector_config(case))
    out = rfc_request()
    provider.apply(out, await provider.fetch(CredentialRequest("example", (), AGENT)))
    assert out.headers["Signature-Input"] == case["signature_input"]
    base = "\n".join(case["base"]).encode()
    public = public_key(case["key"])
    assert verify_with(case["algorithm"], public, base, signature_of(out.headers["Signature"], case["label"]))
    assert verify_with(case["algorithm"], public, base, signature_of(case["signature"], case["label"]))
    if case["algorithm"] in DETERMINISTIC:
        assert out.headers["Signature"] == case["signature"]


def test_the_rfc_response_vector_verifies_over_the_base_built_here():
    """B.2.4 (a response, ecdsa-p256-sha256): the signature base built from the test-response's values is the
    RFC's, and the RFC's signature verifies over it (issue 14 item 2)."""
    case = CASES["B.2.4"]
    headers = CIMultiDict(B2["test-response"]["headers"])
    lines = [('"@status"', str(B2["test-response"]["status"]))]
    lines += [(f'"{name}"', headers[name]) for name in case["components"][1:]]
    params = signature_params(tuple(f'"{c}"' for c in case["components"]), case["params"])
    base = signature_base(lines, params)
    assert base == "\n".join(case["base"])
    assert f'{case["label"]}={params}' == case["signature_input"]
    assert verify_with(case["algorithm"], public_key(case["key"]), base.encode(),
                       signature_of(case["signature"], case["label"]))


@pytest.mark.parametrize("section", CASES)
def test_an_altered_byte_in_any_line_of_a_vector_base_fails_verification(section):
    """Changing one character of any line of an RFC signature base makes the RFC's signature fail
    (issue 14 item 2)."""
    case = CASES[section]
    signature = signature_of(case["signature"], case["label"])
    public = public_key(case["key"])
    for i, line in enumerate(case["base"]):
        altered = [*case["base"]]
        altered[i] = line[:-1] + ("x" if line[-1] != "x" else "y")
        assert not verify_with(case["algorithm"], public, "\n".join(altered).encode(), signature), (section, i)


# --- configuration ---------------------------------------------------------------------


def _pem(key: Any) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


@pytest.mark.parametrize("raw, expected", [
    # an RSA key cannot sign ed25519
    ({"algorithm": "ed25519", "key": {"from_file": str(key_file("test-key-rsa"))}},
     "credentials.test.key: must be an Ed25519 private key for ed25519"),
    # an Ed25519 key cannot sign ecdsa-p256-sha256
    ({"algorithm": "ecdsa-p256-sha256", "key": {"from_file": str(key_file("test-key-ed25519"))}},
     "credentials.test.key: must be an EC P-256 private key for ecdsa-p256-sha256"),
    # a P-384 key is not P-256
    ({"algorithm": "ecdsa-p256-sha256", "key": {"value": _pem(ec.generate_private_key(ec.SECP384R1()))}},
     "credentials.test.key: must be an EC P-256 private key for ecdsa-p256-sha256"),
    # an EC key cannot sign rsa-pss-sha512
    ({"algorithm": "rsa-pss-sha512", "key": {"from_file": str(key_file("test-key-ecc-p256"))}},
     "credentials.test.key: must be an RSA (2048 bits or more) private key for rsa-pss-sha512"),
    # RSA below 2048 bits
    ({"algorithm": "rsa-v1_5-sha256", "key": {"value": _pem(rsa.generate_private_key(65537, 1024))}},
     "credentials.test.key: must be an RSA (2048 bits or more) private key for rsa-v1_5-sha256"),
    # not a PEM key at all; the value is never repeated
    ({"algorithm": "ed25519", "key": {"value": "not-a-key-canary-5150"}},
     "credentials.test.key: must be an unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1)"),
    # an HMAC secret too short to be a key
    ({"algorithm": "hmac-sha256", "key": {"value": base64.b64encode(b"short").decode()}},
     "credentials.test.key: must be a shared secret of at least 32 bytes for hmac-sha256"),
    # an HMAC secret that is not the declared encoding
    ({"algorithm": "hmac-sha256", "key": {"value": "not base64 canary-5150!"}},
     "credentials.test.key: must be a shared secret in base64 (key_encoding)"),
    # key_encoding only means something for a shared secret
    ({"algorithm": "ed25519", "key_encoding": "hex", "key": {"from_file": str(key_file("test-key-ed25519"))}},
     "credentials.test.key_encoding: applies only to hmac-sha256 (other keys are PEM)"),
    # an algorithm RFC 9421 does not register (or this signer does not offer)
    ({"algorithm": "ecdsa-p384-sha384", "key": {"from_file": str(key_file("test-key-ed25519"))}},
     "credentials.test.algorithm: must be one of hmac-sha256, ed25519, ecdsa-p256-sha256, rsa-pss-sha512, "
     "rsa-v1_5-sha256, got 'ecdsa-p384-sha384'"),
])
def test_a_key_that_cannot_sign_as_configured_is_a_config_error_with_its_path(raw, expected):
    """The key is parsed at load: one that does not fit its algorithm is refused with its path, and the key's
    value never appears in the message (issue 14 item 2)."""
    errors = config_errors("http_signature", {"type": "http_signature", "components": [], **raw})
    assert any(e.startswith(expected) for e in errors), errors
    assert "canary-5150" not in " ".join(errors)


ED25519 = {"algorithm": "ed25519", "key": {"from_file": str(key_file("test-key-ed25519"))}}


@pytest.mark.parametrize("raw, expected", [
    # a derived component the signer cannot produce for a request
    ({"components": ["@status"]}, "credentials.test.components[0]: '@status' is not a derived component"),
    # framing and the signature fields are written by the connection or the sidecar
    ({"components": ["transfer-encoding"]}, "credentials.test.components[0]: transfer-encoding cannot be covered"),
    ({"components": ["@method", "signature"]}, "credentials.test.components[1]: signature cannot be covered"),
    # not a field name
    ({"components": ["x request"]}, "credentials.test.components[0]: 'x request' is not an HTTP field name"),
    # the same component twice (case does not make it another)
    ({"components": ["content-type", "Content-Type"]}, "credentials.test.components[1]: 'Content-Type' is listed"),
    # a digest algorithm without content-digest among the components
    ({"components": ["@method"], "content_digest": "sha-512"},
     "credentials.test.content_digest: is set, but components do not cover content-digest"),
    ({"components": ["content-digest"], "content_digest": "md5"}, "credentials.test.content_digest: must be one of"),
    # the label is a structured-field key
    ({"components": [], "label": "Sig 1"}, "credentials.test.label: must be a structured-field key"),
    # parameters are structured-field strings
    ({"components": [], "keyid": "clé"}, "credentials.test.keyid: must be printable ASCII"),
    ({"components": [], "expires": "0s"}, "credentials.test.expires: must be at least 1s"),
    # components are required: the upstream's verifier decides them
    ({}, "credentials.test.components: is required"),
])
def test_components_and_parameters_are_checked_at_load(raw, expected):
    """Components and parameters that could not be signed as an RFC 9421 verifier reads them are config
    errors with their paths (issue 14 item 2)."""
    errors = config_errors("http_signature", {"type": "http_signature", **ED25519, **raw})
    assert any(e.startswith(expected) for e in errors), errors


def test_the_key_is_parsed_once_and_never_shown():
    """The spec holds a parsed key, not a PEM string; neither the spec's nor the provider's repr shows it
    (issue 14 item 2)."""
    spec = parse_spec("http_signature", {**ED25519, "algorithm": "hmac-sha256", "key": {"value": SHARED_SECRET},
                                       "components": ["@method"]})
    assert isinstance(spec.key.secret, bytes)
    provider = http_signature.HttpSignatureProvider("partner", spec, ProviderDeps(agent_id=AGENT, id_key=b"k" * 32))
    for shown in (repr(spec), repr(provider), repr(spec.key)):
        assert SHARED_SECRET not in shown and repr(base64.b64decode(SHARED_SECRET)) not in shown


# --- on the wire (issue 14 item 6) ---------------------------------------------------------------


KEYS = {"hmac-sha256": "test-shared-secret", "ed25519": "test-key-ed25519", "ecdsa-p256-sha256": "test-key-ecc-p256",
        "rsa-pss-sha512": "test-key-rsa-pss", "rsa-v1_5-sha256": "test-key-rsa"}
VERIFIERS = {"hmac-sha256": algorithms.HMAC_SHA256, "ed25519": algorithms.ED25519,
             "ecdsa-p256-sha256": algorithms.ECDSA_P256_SHA256, "rsa-pss-sha512": algorithms.RSA_PSS_SHA512,
             "rsa-v1_5-sha256": algorithms.RSA_V1_5_SHA256}
COVERED = ["@method", "@target-uri", "@authority", "@path", "@query", "@query-param;name=b", "host", "content-type",
           "content-length", "content-digest", "x-request-id"]
POLICY = {"version": 1, "default": "deny", "rules": [
    {"id": "partner", "direction": "outbound", "upstream": "partner", "paths": ["/v1/**"], "effect": "allow"}]}
BODY = b'{"invoice": 42, "lines": ["' + b"x" * 5000 + b'"]}'


def signing_config(upstream: Upstream, algorithm: str, **extra: Any) -> dict[str, Any]:
    """An upstream with a base path whose default credential signs every covered component there is."""
    credential = {"type": "http_signature", "algorithm": algorithm, "key": {"from_file": str(key_file(KEYS[algorithm]))},
                  "keyid": KEYS[algorithm], "components": COVERED, "content_digest": "sha-512", "expires": "5m",
                  "nonce": True, "tag": "partner-api", "alg": True, **extra}
    return {"outbound": {"upstreams": {"partner": {"url": upstream.url + "/api", "hosts": ["partner.internal"],
                                                   "credential": "partner-sig"}}},
            "credentials": {"partner-sig": credential}}


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    """A body of unknown length: the agent sends it chunked."""
    for start in range(0, len(data), 1000):
        yield data[start:start + 1000]


async def send(h: Any, method: str = "POST", path: str = "/partner/v1/items?b=2&a=%20x", body: Any = BODY,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    sent = {"Content-Type": "application/json", "X-Request-Id": "req-7", **(headers or {})}
    async with aiohttp.ClientSession() as s:
        async with s.request(method, f"{h.outbound}{path}", data=body, headers=sent) as r:
            return r.status, await r.json(content_type=None)


@dataclass
class Received:
    """The request as the upstream received it, in the shape http-message-signatures reads."""

    method: str
    url: str
    headers: CIMultiDict[str]


def received(seen: Seen) -> Received:
    return Received(seen.method, f"http://{seen.header('Host')}{seen.path}", CIMultiDict(seen.headers))


class OneKey(HTTPSignatureKeyResolver):
    def __init__(self, key: Any) -> None:
        self.key = key

    def resolve_public_key(self, key_id: str) -> Any:
        return self.key


def verify_received(algorithm: str, message: Received, body: bytes) -> Any:
    """Verify as the upstream would, with the independent http-message-signatures package."""
    verifier = HTTPMessageVerifier(signature_algorithm=VERIFIERS[algorithm],
                                   key_resolver=OneKey(public_key(KEYS[algorithm])))
    covered = [c if not c.startswith("@query-param") else '"@query-param";name="b"' for c in COVERED]
    [result] = verifier.verify(message, body=body, require_components=covered, expect_tag="partner-api")
    return result


@pytest.mark.parametrize("algorithm", list(KEYS))
async def test_the_upstream_verifies_what_it_received_with_an_independent_verifier(make_sidecar, upstream, algorithm):
    """Every algorithm: an agent's chunked upload reaches the upstream framed with a Content-Length, under the
    base path, with a Content-Digest, and http-message-signatures verifies the signature and digest over what the
    upstream received (issue 14 items 2 and 6)."""
    h = await make_sidecar(signing_config(upstream, algorithm), POLICY)
    status, _ = await send(h, body=chunks(BODY))
    assert status == 200
    [seen] = upstream.seen
    assert seen.path == "/api/v1/items?b=2&a=%20x" and seen.body == BODY
    assert seen.header("Content-Length") == str(len(BODY)) and not seen.has_header("Transfer-Encoding")
    result = verify_received(algorithm, received(seen), seen.body)
    assert (result.label, result.parameters["keyid"], result.parameters["alg"]) == ("sig1", KEYS[algorithm], algorithm)
    assert result.parameters["expires"] - result.parameters["created"] == 300 and result.nonce
    [event] = await h.settle()
    assert (event["decision"], event["credential"]["type"], event["credential"]["source"]) == (
        "allow", "http_signature", "static")
    log = h.raw_log().decode()
    assert SHARED_SECRET not in log and "PRIVATE KEY" not in log


async def test_a_forward_proxy_request_is_signed_as_it_is_forwarded(make_sidecar, upstream):
    """An absolute-URI request for a mapped host is signed with the Host and base path the upstream receives,
    not the agent's, and verifies there (issue 14 item 6)."""
    h = await make_sidecar(signing_config(upstream, "rsa-v1_5-sha256"), POLICY)
    headers = {"Content-Type": "application/json", "X-Request-Id": "req-7"}
    async with aiohttp.ClientSession() as s:
        async with s.put("http://partner.internal/api/v1/items?b=2", data=BODY, headers=headers,
                         proxy=h.outbound) as r:
            assert r.status == 200
    [seen] = upstream.seen
    assert (seen.header("Host"), seen.path) == (f"127.0.0.1:{upstream.port}", "/api/v1/items?b=2")
    assert verify_received("rsa-v1_5-sha256", received(seen), seen.body).covered_components['"@method"'] == "PUT"


def _altered(message: Received, **changes: Any) -> Received:
    headers = CIMultiDict(message.headers)
    for name, value in changes.pop("headers", {}).items():
        headers[name] = value
    return Received(changes.get("method", message.method), changes.get("url", message.url), headers)


async def test_an_altered_byte_anywhere_covered_fails_verification(make_sidecar, upstream):
    """What the upstream received verifies; the same request with any covered part changed by one byte does not
    (issue 14 items 2 and 6)."""
    h = await make_sidecar(signing_config(upstream, "ed25519"), POLICY)
    assert (await send(h))[0] == 200
    [seen] = upstream.seen
    message, port = received(seen), upstream.port
    verify_received("ed25519", message, seen.body)
    params = message.headers["Signature-Input"]
    alterations = {
        "method": (_altered(message, method="PUT"), seen.body),
        "path": (_altered(message, url=message.url.replace("/items", "/itemz")), seen.body),
        "query": (_altered(message, url=message.url.replace("b=2", "b=3")), seen.body),
        "query, unnamed parameter": (_altered(message, url=message.url.replace("%20x", "%20y")), seen.body),
        "authority": (_altered(message, url=message.url.replace(str(port), str(port + 1)),
                               headers={"Host": f"127.0.0.1:{port + 1}"}), seen.body),
        "host header only": (_altered(message, headers={"Host": f"127.0.0.1:{port}0"}), seen.body),
        "content-type": (_altered(message, headers={"Content-Type": "application/jsoN"}), seen.body),
        "named header": (_altered(message, headers={"X-Request-Id": "req-8"}), seen.body),
        "content-length": (_altered(message, headers={"Content-Length": str(len(seen.body) + 1)}), seen.body),
        "body": (message, seen.body[:-2] + b"!" + seen.body[-1:]),
        "signature parameters": (_altered(message, headers={"Signature-Input": params.replace("partner-api",
                                                                                              "partner-apx")}),
                                 seen.body),
    }
    for what, (altered, body) in alterations.items():
        with pytest.raises(InvalidSignature):
            verify_received("ed25519", altered, body)
            pytest.fail(f"an altered {what} still verified")


async def test_the_agents_own_signature_fields_are_replaced(make_sidecar, upstream):
    """An agent's Signature, Signature-Input and Content-Digest never reach the upstream beside the sidecar's
    (issue 14 item 2)."""
    h = await make_sidecar(signing_config(upstream, "ecdsa-p256-sha256"), POLICY)
    forged = {"Signature": "sig1=:AAAA:", "Signature-Input": 'sig1=("@method");keyid="agent"',
              "Content-Digest": "sha-256=:AAAA:"}
    assert (await send(h, headers=forged))[0] == 200
    [seen] = upstream.seen
    for name in forged:
        assert [k for k, _ in seen.headers if k.lower() == name.lower()] == [name], name
        assert seen.header(name) != forged[name]
    verify_received("ecdsa-p256-sha256", received(seen), seen.body)


async def test_a_body_is_streamed_unread_when_nothing_covers_it(make_sidecar, upstream):
    """With neither content-length nor content-digest covered the body is not buffered: the agent's chunked
    upload is forwarded chunked, and the signature over the rest verifies (issue 14 item 2)."""
    covered = ["@method", "@target-uri", "content-type"]
    config = signing_config(upstream, "hmac-sha256", components=covered)
    del config["credentials"]["partner-sig"]["content_digest"]
    h = await make_sidecar(config, POLICY)
    assert (await send(h, body=chunks(BODY)))[0] == 200
    [seen] = upstream.seen
    assert seen.header("Transfer-Encoding") == "chunked" and seen.body == BODY
    verifier = HTTPMessageVerifier(signature_algorithm=algorithms.HMAC_SHA256,
                                   key_resolver=OneKey(public_key("test-shared-secret")))
    verifier.verify(received(seen), require_components=covered)


@pytest.mark.parametrize("method, headers, named", [
    # a covered header the agent did not send
    ("POST", {"X-Request-Id": ""}, "x-request-id"),
    # a GET without a body is written without Content-Length: a covered content-length cannot be signed
    ("GET", {}, "content-length"),
])
async def test_a_covered_header_the_request_lacks_is_refused(make_sidecar, upstream, method, headers, named):
    """A request without a header the signature covers is refused with a 400 naming it; nothing is forwarded
    and one event says why (issue 14 item 2)."""
    h = await make_sidecar(signing_config(upstream, "ed25519"), POLICY)
    sent = {k: v for k, v in {"Content-Type": "application/json", "X-Request-Id": "req-7", **headers}.items() if v}
    async with aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as s:
        async with s.request(method, f"{h.outbound}/partner/v1/items?b=2", data=BODY if method == "POST" else None,
                             headers=sent) as r:
            status, refusal = r.status, await r.json(content_type=None)
    assert (status, refusal["error"]) == (400, "bad_request")
    assert f"covered header {named} is not on the request" in refusal["message"]
    assert upstream.seen == []
    [event] = await h.settle()
    assert (event["decision"], event["reason"], event["status"]) == ("deny", "bad_request", 400)


async def test_a_body_of_unknown_length_over_the_limit_is_refused_when_a_digest_is_covered(make_sidecar, upstream):
    """With content-digest covered the body is read whole: a chunked upload over max_body_bytes is refused
    413 body_too_large before anything is sent upstream (issue 14 item 2)."""
    config = signing_config(upstream, "rsa-pss-sha512")
    config["outbound"]["limits"] = {"max_body_bytes": 4096}
    h = await make_sidecar(config, POLICY)
    status, refusal = await send(h, body=chunks(BODY))
    assert (status, refusal["error"]) == (413, "body_too_large")
    assert upstream.seen == []
    [event] = await h.settle()
    assert (event["reason"], event["status"]) == ("body_too_large", 413)


async def test_a_covered_value_that_is_not_ascii_is_refused(make_sidecar, upstream):
    """A covered header holding non-ASCII text cannot go into a signature base: 400 naming it, nothing
    forwarded, one event (issue 14 item 2)."""
    h = await make_sidecar(signing_config(upstream, "hmac-sha256"), POLICY)
    port = h.port("outbound")
    head = (f"POST /partner/v1/items?b=2 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"X-Request-Id: café\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}")
    answer = await raw_http(port, head.encode())
    status_line, _, body = answer.partition(b"\r\n\r\n")
    assert status_line.startswith(b"HTTP/1.1 400")
    refusal = json.loads(body)
    assert refusal["error"] == "bad_request" and '"x-request-id" is not printable ASCII' in refusal["message"]
    assert upstream.seen == []
    [event] = await h.settle()
    assert (event["reason"], event["status"]) == ("bad_request", 400)
