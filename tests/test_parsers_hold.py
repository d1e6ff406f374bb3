"""Every parser at the edge, fed arbitrary input, refuses with its own type or returns a value that holds.

Property tests (hypothesis), bounded so the whole file takes seconds (issue 12 item 7): a request
path is canonical once (canonicalizing it again changes nothing) and never keeps a dot segment; a
Host is normalized once; a SPIFFE ID round-trips through its text; a bearer token, an MCP body, a
config and a policy file are refused with the component's own refusal, never a stray exception
that would become a 500 or a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config import parse_config
from sidecar.errors import ConfigInvalid, IdentityRefused, RequestRefused
from sidecar.identity.jwt import _parse, bearer_token
from sidecar.identity.spiffe import InvalidSpiffeId, parse_spiffe_id
from sidecar.policy.engine import load_policy
from sidecar.policy.mcp import parse_mcp_request
from sidecar.http.target import canonical_path, has_dot_segment, normalize_host

BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FEWER = settings(BOUNDED, max_examples=50)  # each example builds a whole config or compiles a policy file

# Path-ish text: the characters that matter to canonicalization, percent escapes among them.
PATH_PIECES = st.sampled_from(["/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%25", "%41", "%7e", "%", ";", "a", "Z",
                               "~", "-", "_", "?", "#", "\\", " ", "\t", "\x00", "é", "%c3%a9", "%ff", "//"])
PATHS = st.lists(PATH_PIECES, max_size=20).map("".join)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.text(max_size=12))
TREES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                     max_leaves=25)


@BOUNDED
@given(PATHS)
def test_a_canonical_path_is_canonical_once(raw: str) -> None:
    """canonical_path refuses, or returns an absolute path without dot segments that it maps to itself."""
    try:
        path = canonical_path("/" + raw)
    except RequestRefused:
        return
    assert path.startswith("/") and not has_dot_segment(path)
    assert canonical_path(path) == path


@BOUNDED
@given(st.text(alphabet="abcXYZ019.-:[]%_@ \t\x00é", max_size=40), st.sampled_from(["http", "https"]))
def test_a_host_is_normalized_once(raw: str, scheme: str) -> None:
    """normalize_host refuses, or returns a lowercase host whose normal form is itself."""
    try:
        host, port = normalize_host(raw, scheme)
    except RequestRefused:
        return
    assert host == host.lower() and 0 < port < 65536
    shown = f"[{host}]" if ":" in host else host
    assert normalize_host(f"{shown}:{port}", scheme) == (host, port)


@BOUNDED
@given(st.one_of(st.text(max_size=80),
                 st.lists(st.sampled_from(["spiffe://", "SPIFFE://", "example.org", "/", "ns", ".", "..", "%41",
                                           "a-b", "_", "?", "#", "@", ":80", "é", "UPPER"]), max_size=12).map("".join)))
def test_a_spiffe_id_round_trips_or_is_refused(text: str) -> None:
    """parse_spiffe_id refuses with InvalidSpiffeId, or its value's text parses back to the same ID."""
    try:
        spiffe_id = parse_spiffe_id(text)
    except InvalidSpiffeId:
        return
    assert parse_spiffe_id(str(spiffe_id)) == spiffe_id


@BOUNDED
@given(st.lists(st.text(max_size=60), max_size=3))
def test_an_authorization_header_is_a_token_or_a_refusal(values: list[str]) -> None:
    """bearer_token returns None, a token, or refuses token_invalid; nothing else escapes."""
    try:
        bearer_token(values)
    except IdentityRefused as refused:
        assert refused.reason == "token_invalid"


B64ISH = st.text(alphabet="ABCxyz019-_=+/.", max_size=40)


@BOUNDED
@given(st.one_of(st.tuples(B64ISH, B64ISH, B64ISH).map(".".join), B64ISH,
                 st.tuples(TREES, TREES).map(lambda pair: ".".join(_b64(part) for part in pair) + ".c2ln")))
def test_a_token_header_and_payload_are_parsed_or_refused(token: str) -> None:
    """A token's structure is parsed, or refused token_invalid; garbage JSON never escapes as ValueError."""
    try:
        _parse(token)
    except IdentityRefused as refused:
        assert refused.reason == "token_invalid"


@BOUNDED
@given(st.one_of(st.binary(max_size=200), TREES.map(lambda tree: json.dumps(tree).encode()),
                 st.fixed_dictionaries({"jsonrpc": st.sampled_from(["2.0", "1.0", 2]), "id": SCALARS,
                                        "method": st.one_of(st.text(max_size=30), SCALARS),
                                        "params": TREES}).map(lambda doc: json.dumps(doc).encode())))
def test_an_mcp_body_is_a_call_or_a_refusal(body: bytes) -> None:
    """parse_mcp_request returns a call or refuses bad_request (or body_too_large); nothing else escapes."""
    try:
        parse_mcp_request(body, "application/json", 10_000)
    except RequestRefused as refused:
        assert refused.reason in ("bad_request", "body_too_large")


@FEWER
@given(st.dictionaries(st.sampled_from(["agent", "inbound", "outbound", "credentials", "policy", "tasks",
                                        "revocation", "admin", "logging", "shutdown", "state_dir", "x"]),
                       TREES, max_size=5))
def test_a_config_loads_or_lists_its_problems(tmp_path_factory: pytest.TempPathFactory, raw: dict) -> None:
    """parse_config returns a config or raises ConfigInvalid with every problem; nothing else escapes."""
    base = tmp_path_factory.mktemp("config")
    try:
        parse_config(raw, base_dir=base)
    except ConfigInvalid as invalid:
        assert invalid.errors and all(str(error) for error in invalid.errors)


@FEWER
@given(st.one_of(TREES, st.fixed_dictionaries({"version": st.sampled_from([1, 2, "1"]),
                                               "rules": st.lists(TREES, max_size=3)})))
def test_a_policy_file_compiles_or_lists_its_problems(tmp_path_factory: pytest.TempPathFactory,
                                                      document: object) -> None:
    """load_policy compiles a file or raises ConfigInvalid; nothing else escapes."""
    path = Path(tmp_path_factory.mktemp("policy")) / "policy.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_policy([path], upstreams={"billing": "http"}, credentials={})
    except ConfigInvalid as invalid:
        assert invalid.errors


def _b64(tree: object) -> str:
    import base64

    return base64.urlsafe_b64encode(json.dumps(tree).encode()).rstrip(b"=").decode()
