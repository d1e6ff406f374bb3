"""The token endpoint client's pure logic: client authentication, token responses, error details.
Against a real token endpoint: tests/credentials/test_oauth2.py and test_token_exchange.py."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
import pytest

from sidecar.credentials import token_endpoint
from sidecar.credentials.base import ProviderDeps
from sidecar.credentials.specs import Endpoint
from sidecar.errors import CredentialUnavailable
from tests.credentials.providers import ID_KEY
from tests.peers.oidc import AGENT_SPIFFE_ID


def test_basic_authorization_form_urlencodes_before_base64() -> None:
    """RFC 6749 §2.3.1: id and secret are form-urlencoded, then joined by ':' and base64-encoded."""
    header = token_endpoint.basic_authorization("svc one", "p@ss:w+rd/ü")
    assert header.startswith("Basic ")
    assert base64.b64decode(header[6:]).decode() == "svc+one:p%40ss%3Aw%2Brd%2F%C3%BC"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"token_type": "Bearer"}, "without an access_token"),  # RFC 6749 §5.1: access_token is required
        ({"access_token": "abc", "token_type": "DPoP"}, "issued a DPoP token"),  # RFC 9449: not supported here
        ({"access_token": "abc"}, "issued a unknown token"),  # token_type is required
        ({"access_token": "abc", "token_type": "bearer", "cnf": {"x5t#S256": "!!"}}, "unreadable cnf"),
    ],
)
def test_unusable_token_responses_are_refused(body: dict[str, Any], message: str) -> None:
    """A token response without a usable bearer token is refused at fetch, not sent upstream."""
    with pytest.raises(CredentialUnavailable, match=message):
        token_endpoint.parse_token_response("test", json.dumps(body).encode())


def test_an_opaque_token_gets_a_keyed_id_and_default_lifetime() -> None:
    """No jti to use: the id is a keyed hash of the token; lifetime from expires_in, else 300 s."""
    endpoint = token_endpoint.TokenEndpoint("test", Endpoint("https://as.example/token", "c", "tls_client_auth"),
                                    ProviderDeps(agent_id=AGENT_SPIFFE_ID, id_key=ID_KEY, clock=lambda: 1000.0))
    for body, lifetime in (({"expires_in": 60}, 60.0), ({}, token_endpoint.DEFAULT_LIFETIME)):
        raw = {"access_token": "opaque-token-value", "token_type": "Bearer", **body}
        resp = token_endpoint.parse_token_response("test", json.dumps(raw).encode())
        credential = endpoint.credential("oauth2_client_credentials", resp, scopes=("a",), audience=None)
        assert credential.id is not None and credential.id.startswith("h:") and "opaque" not in credential.id
        assert (credential.issued_at, credential.expires_at, credential.scopes) == (1000.0, 1000.0 + lifetime, ("a",))


def test_error_details_are_cleaned_and_never_the_body() -> None:
    """The detail holds the error code and a redacted, truncated description; a non-JSON body, only the status."""
    secret = "form-secret-Kz81"
    token = jwt.encode({"sub": "x"}, "k" * 32, algorithm="HS256")
    body = {"error": "invalid_grant", "error_description": f"bad {secret} and {token} " + "x" * 300}
    detail, code = token_endpoint.error_detail(400, json.dumps(body).encode(), (secret,))
    assert code == "invalid_grant" and detail.startswith("token endpoint: invalid_grant (http 400): bad ")
    assert secret not in detail and token not in detail and len(detail) < 200
    assert token_endpoint.error_detail(502, b"<html>upstream secret</html>", ()) == ("token endpoint: http 502", None)
    assert token_endpoint.error_detail(400, b'{"error": "<script>"}', ()) == ("token endpoint: http 400", None)
