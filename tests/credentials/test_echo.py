"""The echo guard: response headers never hand back the secret the sidecar attached (issue 11 item 5)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from sidecar.credentials.base import Credential
from sidecar.credentials.echo import EchoGuard
from sidecar.fields import Secret

SECRET = "k3y/with+odd=chars"
UPPER = "k3y%2Fwith%2Bodd%3Dchars"  # urllib.parse.quote(SECRET, safe=""), as the static provider sends it
LOWER = "k3y%2fwith%2bodd%3dchars"  # the same escapes in lowercase hex
TWICE = "k3y%252Fwith%252Bodd%253Dchars"  # encoded again by an upstream that re-escapes its redirect


@pytest.mark.parametrize("name, value, kept", [
    # the ordinary "same URL plus a slash" redirect: the query parameter goes, the redirect stays useful
    ("Location", f"https://api.example/v1/files/?api_key={UPPER}", "https://api.example/v1/files/"),
    # ... in either case of the percent-encoding, or encoded twice
    ("Location", f"/v1/files/?api_key={LOWER}", "/v1/files/"),
    ("Location", f"/v1/files/?api_key={TWICE}", "/v1/files/"),
    # other parameters stay, in order, whatever the credential parameter is called
    ("Location", f"/v1/x/?a=1&api_key={UPPER}&b=2", "/v1/x/?a=1&b=2"),
    ("Location", f"/v1/x/?api_key={UPPER}&b=2#top", "/v1/x/?b=2#top"),
    ("Content-Location", f"/v1/x?token={SECRET}", "/v1/x"),
    # Link (RFC 8288) repeats URLs inside <...>; Refresh names one after url=
    ("Link", f'</v1/x?page=2&api_key={UPPER}>; rel="next", </v1/x?page=1>; rel="prev"',
     '</v1/x?page=2>; rel="next", </v1/x?page=1>; rel="prev"'),
    ("Refresh", f"0; url=/v1/x?api_key={UPPER}", "0; url=/v1/x"),
    # the secret anywhere else in a header: the header goes (raw, encoded, form-encoded)
    ("X-API-Key", SECRET, None),
    ("Location", f"/v1/{UPPER}/x", None),
    ("Location", f"/login?next=%2Fv1%2Fx%3Fapi_key%3D{TWICE}", None),  # inside another parameter's URL
    ("Set-Cookie", f"echo={LOWER}; Path=/", None),
    ("WWW-Authenticate", f'Bearer error="invalid_token", token="{SECRET}"', None),
])
def test_a_header_carrying_the_secret_is_cleaned_or_dropped(name: str, value: str, kept: str | None) -> None:
    """A query parameter holding the secret is removed from the URL; any other trace drops the header."""
    headers = CIMultiDict([("Content-Type", "text/html"), (name, value)])
    scrubbed, done = EchoGuard(SECRET).scrub(headers)
    assert scrubbed.get(name) == kept
    assert scrubbed["Content-Type"] == "text/html"
    assert done == (f"{name.lower()}: " + ("query parameter removed" if kept else "dropped"),)
    assert not any(SECRET in v or LOWER in v.lower() for v in scrubbed.values())


def test_headers_without_the_secret_come_back_untouched() -> None:
    """Nothing to remove: the same headers object, nothing done (the relay then changes nothing)."""
    headers = CIMultiDict([("Location", "/v1/files/?api_key=someone-else"), ("Link", "</v1/x>; rel=next")])
    scrubbed, done = EchoGuard(SECRET).scrub(headers)
    assert scrubbed is headers and done == ()


def test_every_credential_with_a_token_carries_a_guard_whose_repr_is_masked() -> None:
    """A minted bearer token is guarded from the moment its credential exists; no repr shows it."""
    credential = Credential(type="oauth2_client_credentials", provider="p", id="j", token=Secret("eyJ.minted.tok"))
    assert credential.echo is not None and credential.echo.carried("x-echo: Bearer eyJ.minted.tok")
    assert "eyJ" not in repr(credential) and "eyJ" not in repr(credential.echo)
    assert Credential(type="aws_sigv4", provider="p", id="k").echo is None


@pytest.mark.parametrize("form", [
    SECRET,                          # raw, as a debug endpoint prints its headers
    UPPER, LOWER, TWICE,             # percent-encoded, either case, twice
    "k3y\\/with+odd=chars",          # JSON with "/" escaped (PHP's json_encode, Java's Jackson option)
])
def test_a_body_repeating_the_secret_gets_it_replaced(form: str) -> None:
    """Every form in which a body may repeat the secret becomes <redacted>; the rest of the body stays."""
    body = f'{{"error": "denied", "received": "{form}", "n": 1}}'.encode()
    scrubbed = EchoGuard(SECRET).scrub_body(body)
    assert scrubbed == b'{"error": "denied", "received": "<redacted>", "n": 1}'


def test_a_body_without_the_secret_is_left_alone() -> None:
    """Nothing found: None, so the relay sends the body it read, untouched."""
    assert EchoGuard(SECRET).scrub_body(b'{"received": "k3y/with+odd"}') is None
