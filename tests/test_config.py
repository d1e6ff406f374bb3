"""Configuration: typed and frozen, every problem at once with its path, secrets masked everywhere."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from sidecar.config import load_config, parse_config
from sidecar.errors import ConfigInvalid
from sidecar.identity.ca import ca_init
from tests.harness import free_port
from tests.scenarios.inbound import ISSUER, ORCHESTRATOR, jwks_file
from tests.scenarios.outbound import POLICY, config_for

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "config" / "sidecar.example.yaml"


def materialize_example(tmp: Path) -> Path:
    """The full example with every absolute path moved under tmp, and those files created."""
    text = EXAMPLE.read_text().replace("/var/run/", f"{tmp}/var/run/").replace("/etc/ssl/", f"{tmp}/etc/ssl/")
    ca_pem = ca_init(tmp / "example-ca").read_text()
    signing_pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    for path in set(re.findall(rf"{re.escape(str(tmp))}/[\w/.-]+", text)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        loaded = ca_pem if path.endswith("-ca.pem") else signing_pem if path.endswith("-ed25519.pem") else None
        Path(path).write_text(loaded or "placeholder\n")  # upstream CAs and http_signature keys are loaded
    text = text.replace("config/policy.example.yaml", str(ROOT / "config" / "policy.example.yaml"))
    out = tmp / "sidecar.yaml"
    out.write_text(text)
    return out


def errors_of(raw: dict, tmp: Path) -> list[str]:
    with pytest.raises(ConfigInvalid) as info:
        parse_config(raw, base_dir=tmp)
    return [str(e) for e in info.value.errors]


def test_the_embedded_defaults_validate():
    """config/sidecar.yaml (what `sidecar run` uses with no -c) loads without a problem."""
    config = load_config(ROOT / "config" / "sidecar.yaml")
    assert config.outbound.listen.is_loopback and "example-api" in config.outbound.upstreams


def test_the_full_reference_example_validates(tmp_path, monkeypatch):
    """config/sidecar.example.yaml, every key of PRODUCT.md, loads once its files exist."""
    monkeypatch.setenv("LEGACY_KEY", "legacy-canary-value-31")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-canary")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-canary-77")
    config = load_config(materialize_example(tmp_path))
    assert set(config.credentials) >= {"billing-oauth", "on-behalf-of-user", "service-assertion", "aws-s3",
                                       "partner-signed", "legacy-key"}
    assert config.outbound.upstreams["billing-api"].base_path == "/api"
    assert config.tasks.ttl == 900 and config.policy.approval_timeout == 300
    assert "legacy-canary-value-31" not in repr(config)


def test_every_problem_is_reported_at_once_with_its_path(tmp_path):
    """Unknown keys, bad URLs, a non-loopback outbound listener and dangling references come out together."""
    (tmp_path / "not-a-ca.pem").write_text("not a certificate\n")
    raw = {
        "agent": {"name": "a", "colour": "blue"},
        "outbound": {"listen": "0.0.0.0:17001", "upstreams": {
            "billing": {"url": "ftp://billing", "credential": "nope"},
            "crm": {"url": "https://crm.internal", "paths": {"merge_slashes": "yes"}},
            "erp": {"url": "https://erp.internal", "ca": str(tmp_path / "not-a-ca.pem")},
        }},
        "credentials": {"weird": {"type": "magic"},
                        "static-one": {"type": "static", "header": "X_Key", "value": {"value": "s3cr3t-canary"}}},
        "tasks": {"ttl": "2h", "max_ttl": "1h"},
        "shutdown": {"drain": "soon"},
    }
    errors = errors_of(raw, tmp_path)
    expected = [
        "agent.colour: unknown key",
        "outbound.listen: must be a loopback address",
        "outbound.upstreams.billing.url: must be an absolute http or https URL",
        "outbound.upstreams.crm.paths.merge_slashes: must be true or false",
        "outbound.upstreams.erp.ca: expected a PEM file of CA certificates",
        "credentials.weird.type: unknown credential type 'magic'; valid types:",
        "credentials.static-one.header: must be an HTTP header name without '_'",
        "tasks.ttl: must not exceed max_ttl",
        "shutdown.drain: must be a duration",
    ]
    for prefix in expected:
        assert any(e.startswith(prefix) for e in errors), (prefix, errors)
    assert not any("s3cr3t-canary" in e for e in errors)


@pytest.mark.parametrize(("upstream", "credentials", "expected"), [
    # a bad url does not hide the entry's other problems (its undefined credential)
    ({"url": "ftp://billing", "credential": "nope"}, {},
     ["outbound.upstreams.u.url: must be an absolute http or https URL, got 'ftp://billing'",
      "outbound.upstreams.u.credential: credential 'nope' is not defined under credentials"]),
    # a missing CA file is one problem, not also "no certificates could be loaded"
    ({"url": "https://billing.internal", "ca": "missing-ca.pem"}, {},
     ["outbound.upstreams.u.ca: file not found or not readable: missing-ca.pem"]),
    # a secret given as a plain string is one problem, not also "must be a mapping"
    ({"url": "https://billing.internal"}, {"k": {"type": "static", "header": "X-Key", "value": "s3cr3t-canary"}},
     ["credentials.k.value: must be exactly one of {value: ...}, {from_env: NAME}, {from_file: PATH}, "
      "got a string"]),
    # the authorization servers an MCP server's metadata may name: only for mcp, only https issuers (issue 13 item 4)
    ({"url": "https://billing.internal", "authorization_servers": ["https://idp.example"]}, {},
     ["outbound.upstreams.u.authorization_servers: applies only to protocol mcp upstreams"]),
    ({"url": "https://tools.internal/mcp", "protocol": "mcp", "authorization_servers": ["http://idp.example"]}, {},
     ["outbound.upstreams.u.authorization_servers[0]: must be an https issuer URL without query or fragment, "
      "got 'http://idp.example'"]),
])
def test_every_independent_problem_is_reported_exactly_once(tmp_path, upstream, credentials, expected):
    """validate lists each independent problem of an entry once, none hidden by another (issue 11 item 18)."""
    raw = {"outbound": {"upstreams": {"u": upstream}}, "credentials": credentials}
    assert errors_of(raw, tmp_path) == expected


def test_a_rejected_url_is_echoed_without_its_password(tmp_path):
    """A URL refused for its scheme is shown in the message, but not the user info it may carry."""
    errors = errors_of({"outbound": {"upstreams": {"u": {"url": "ftp://bob:url-canary-pw@files.example/x"}}}},
                       tmp_path)
    assert "outbound.upstreams.u.url: must be an absolute http or https URL, got 'ftp://<redacted>@files.example/x'" \
        in errors, errors


@pytest.mark.parametrize("credential, path, message", [
    # token endpoints must be https except on loopback
    ({"type": "oauth2_client_credentials", "token_url": "http://login.example.com/token", "client_id": "x",
      "auth": "client_secret_basic", "client_secret": {"value": "v"}}, "credentials.c.token_url", "https"),
    # a secret reference names exactly one source
    ({"type": "static", "header": "X-Key", "value": {"value": "a", "from_env": "B"}}, "credentials.c.value",
     "exactly one of"),
    # an unset environment variable is a config error, not an empty secret
    ({"type": "static", "header": "X-Key", "value": {"from_env": "SIDECAR_TEST_UNSET_VAR"}},
     "credentials.c.value.from_env", "is not set"),
])
def test_credential_errors_name_their_path(tmp_path, credential, path, message):
    """Credential sections are validated by their provider, with paths and what was expected."""
    errors = errors_of({"credentials": {"c": credential}}, tmp_path)
    assert any(e.startswith(path) and message in e for e in errors), errors


def test_secrets_are_masked_in_reprs_and_validate_output(tmp_path):
    """A secret in the config appears in no repr, no validate output and no error message."""
    secret = "validate-canary-secret-8812"
    config_file = tmp_path / "sidecar.yaml"
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "default": "deny", "rules": []}))
    config_file.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"),
        "outbound": {"upstreams": {"u": {"url": "https://u.example", "credential": "k"}}},
        "credentials": {"k": {"type": "static", "header": "X-Key", "value": {"value": secret}}},
        "policy": {"files": [str(policy)]},
    }))
    config = load_config(config_file)
    assert secret not in repr(config) and secret not in str(config.credentials)
    result = subprocess.run([sys.executable, "-m", "sidecar", "validate", "-c", str(config_file)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr


def test_validate_exits_1_and_lists_every_problem(tmp_path):
    """`sidecar validate` prints each problem with its path and exits 1."""
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(yaml.safe_dump({"outbound": {"listen": "10.0.0.1:17001", "upstreams": {
        "u": {"url": "nope"}}}, "bogus": 1}))
    result = subprocess.run([sys.executable, "-m", "sidecar", "validate", "-c", str(config_file)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    for path in ("outbound.listen:", "outbound.upstreams.u.url:", "bogus: unknown key"):
        assert path in result.stderr


def test_validate_refuses_a_rule_credential_without_its_upstream(tmp_path):
    """validate lists a rule credential without upstream (sent everywhere) beside other problems (issue 11 item 6)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "default": "deny", "rules": [
        {"id": "key-everywhere", "direction": "outbound", "credential": "k", "effect": "allow"},
        {"id": "bad-path", "direction": "outbound", "upstream": "u", "paths": ["v1"], "effect": "allow"}]}))
    config_file = tmp_path / "sidecar.yaml"
    config_file.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"),
        "outbound": {"upstreams": {"u": {"url": "https://u.example"}, "other": {"url": "https://other.example"}}},
        "credentials": {"k": {"type": "static", "header": "X-Key", "value": {"value": "validate-canary-77"}}},
        "policy": {"files": [str(policy)]}}))
    result = subprocess.run([sys.executable, "-m", "sidecar", "validate", "-c", str(config_file)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"{policy}: rules[0] (key-everywhere).credential: needs upstream" in result.stderr
    assert f"{policy}: rules[1] (bad-path).paths[0]: must start with '/'" in result.stderr
    assert "validate-canary-77" not in result.stdout + result.stderr


def test_the_config_json_schema_is_in_sync_with_the_loader(tmp_path, monkeypatch):
    """sidecar/schemas/config.schema.json is what the loader accepts today, and the example configs match it."""
    import json

    import jsonschema

    from sidecar.config_schema import generate

    committed = json.loads((ROOT / "sidecar" / "schemas" / "config.schema.json").read_text())
    assert generate() == committed, "regenerate: python -m sidecar.config_schema > sidecar/schemas/config.schema.json"
    validator = jsonschema.Draft202012Validator(committed)
    for example in (ROOT / "config" / "sidecar.yaml", EXAMPLE):
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(example.read_text()))]
        assert not errors, (example.name, errors)
    assert list(validator.iter_errors({"outbound": {"upstreams": {"u": {"url": "https://u", "colour": "x"}}}}))


def test_the_schema_has_a_variant_for_every_registered_credential_type():
    """Each credential type's schema comes from its parser; a type the example does not show cannot be exported."""
    from sidecar.config_schema import SCHEMAS, build
    from sidecar.credentials.registry import PROVIDER_TYPES

    raw = yaml.safe_load((SCHEMAS / "config.exhaustive.yaml").read_text())
    variants = build(raw)["properties"]["credentials"]["anyOf"][0]["additionalProperties"]["oneOf"]
    assert [v["properties"]["type"]["const"] for v in variants] == sorted(PROVIDER_TYPES)
    raw["credentials"] = {k: v for k, v in raw["credentials"].items() if v["type"] != "static"}
    with pytest.raises(ValueError, match="expected an entry of credential type static"):
        build(raw)


@pytest.mark.parametrize("pattern, subject, matched", [
    ("*@example.com", "bob@example.com", True),                    # the documented example
    ("*@example.com", "mallory@evil.test@example.com", False),     # * never crosses an @
    ("*@example.com", "@example.com", False),                      # * is one or more characters
    ("*@example.com", "bob@example.com.evil.test", False),         # the whole subject must match
    ("admin-*@example.com", "admin-bob@example.com", True),        # * inside a part
    ("bob@example.com", "bob@example.com", True),                  # no *: exact
    ("bob@example.com", "bob@example.comx", False),
    ("b?b@example.com", "bob@example.com", False),                 # ? and [] are literal, not globs
])
def test_approver_subjects_match_exactly_or_within_at_signs(pattern, subject, matched):
    """admin.approvers subjects are exact, or patterns whose * cannot cross '@' (issue 11 item 12)."""
    from sidecar.config_model import Approver

    approver = Approver("https://login.example.com", pattern)
    assert approver.matches("https://login.example.com", subject) is matched
    assert approver.matches("https://other.example.com", subject) is False


# -- revocation: Redis Sentinel, TLS and ACL credentials -------------------------------------------

def test_revocation_reads_sentinels_tls_and_acl_passwords_as_typed_masked_values(tmp_path, monkeypatch):
    """A sentinel section, an ACL user and TLS files load as typed values, every password a masked Secret
    (issue 12 item 2)."""
    monkeypatch.setenv("REDIS_ACL_PASSWORD", "acl-canary-pw-4410")
    ca = ca_init(tmp_path / "redis-ca")
    config = parse_config({"revocation": {
        "sentinel": {"sentinels": ["10.0.0.11:26379", "[fd00::12]:26380"], "service_name": "sidecar-bus", "db": 2,
                     "username": {"value": "watcher"}, "password": {"value": "sentinel-canary-pw-4411"}},
        "username": {"value": "sidecar"}, "password": {"from_env": "REDIS_ACL_PASSWORD"}, "tls": {"ca": str(ca)},
    }}, base_dir=tmp_path)
    bus = config.revocation
    assert bus.has_bus and bus.redis_url is None and bus.tls is not None and bus.tls.ca == ca
    assert bus.sentinel is not None and bus.sentinel.sentinels == (("10.0.0.11", 26379), ("fd00::12", 26380))
    assert (bus.sentinel.service_name, bus.sentinel.db) == ("sidecar-bus", 2)
    assert bus.password is not None and bus.password.reveal() == "acl-canary-pw-4410"
    assert bus.password.source == "env:REDIS_ACL_PASSWORD"
    for secret in ("acl-canary-pw-4410", "sentinel-canary-pw-4411", "watcher"):
        assert secret not in repr(config)


def test_every_revocation_problem_is_reported_at_once_and_no_redis_secret_is_echoed(tmp_path):
    """`sidecar validate` lists each problem of the revocation section with its path, and neither the URL's
    password nor the ACL password appears in its output (issue 12 item 2)."""
    config_file = tmp_path / "sidecar.yaml"
    config_file.write_text(yaml.safe_dump({"revocation": {
        "redis_url": "redis://bob:url-canary-pw-5520@redis.internal:6379/0",
        "sentinel": {"sentinels": ["10.0.0.11:26379", "no-port", "10.0.0.13:99999"], "username": {"value": "s"}},
        "username": {"value": "sidecar"}, "password": {"value": "acl-canary-pw-5521"},
        "tls": {"ca": "missing-ca.pem", "cert": "client.crt"},
    }}))
    result = subprocess.run([sys.executable, "-m", "sidecar", "validate", "-c", str(config_file)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1
    for line in (
        "revocation.sentinel.sentinels[1]: must be HOST:PORT with a port from 1 to 65535",
        "revocation.sentinel.sentinels[2]: must be HOST:PORT with a port from 1 to 65535",
        "revocation.sentinel.service_name: is required",
        "revocation.sentinel.username: needs a password too",
        "revocation.tls.ca: file not found or not readable: missing-ca.pem",
        "revocation.tls.cert: file not found or not readable: client.crt",
        "revocation.tls: cert and key go together",
        "revocation: needs at most one of redis_url or sentinel",
        "revocation.tls: needs a rediss:// redis_url",
        "revocation.redis_url: carries credentials: give them in the URL or as username/password, not both",
    ):
        assert line in result.stderr, (line, result.stderr)
    for secret in ("url-canary-pw-5520", "acl-canary-pw-5521"):
        assert secret not in result.stdout + result.stderr


@pytest.mark.parametrize("revocation, expected", [
    # credentials and TLS without a Redis to use them for
    ({"password": {"value": "p"}}, ["revocation: username, password and tls need redis_url or sentinel"]),
    # an empty list of sentinels is one problem
    ({"sentinel": {"sentinels": [], "service_name": "bus"}},
     ["revocation.sentinel.sentinels: needs at least one HOST:PORT"]),
    # a URL of another scheme, named by its path only (it may hold a password)
    ({"redis_url": "http://user:pw-canary@redis:6379"}, ["revocation.redis_url: must be a redis://, rediss:// or "
                                                          "unix:// URL"]),
    # redis-py would take TLS options from the query, verification off included
    ({"redis_url": "rediss://redis:6380/0?ssl_cert_reqs=none&db=1"},
     ["revocation.redis_url: must not set ssl_cert_reqs: TLS is always verified; give the CA as tls.ca"]),
    # a username alone cannot authenticate
    ({"redis_url": "rediss://redis:6380/0", "username": {"value": "sidecar"}},
     ["revocation.username: needs a password too (Redis ACL: AUTH username password)"]),
])
def test_each_revocation_problem_is_reported_once(tmp_path, revocation, expected):
    """The revocation section's problems are each reported once, with the path and what was expected
    (issue 12 item 2)."""
    assert errors_of({"revocation": revocation}, tmp_path) == expected


def test_the_fleet_inventory_has_sane_defaults(tmp_path):
    """A sidecar on a bus registers every 10 s, is live for 30 s after a heartbeat and listed stale for an hour
    (issue 18 item 5)."""
    fleet = parse_config({}, base_dir=tmp_path).fleet
    assert (fleet.register, fleet.heartbeat, fleet.expiry, fleet.keep_stale) == (True, 10.0, 30.0, 3600.0)


@pytest.mark.parametrize("fleet, expected", [
    # an entry that expires before the next heartbeat would flicker between live and stale
    ({"heartbeat": "10s", "expiry": "15s"}, ["fleet.expiry: must be at least twice heartbeat, which must be above 0"]),
    ({"heartbeat": "0s"}, ["fleet.expiry: must be at least twice heartbeat, which must be above 0"]),
    # a stale entry is one that outlived its expiry: it cannot be forgotten before
    ({"keep_stale": "10s"}, ["fleet.keep_stale: must be at least expiry"]),
    ({"ttl": "1m"}, ["fleet.ttl: unknown key"]),
])
def test_each_fleet_problem_is_reported_once(tmp_path, fleet, expected):
    """The fleet section's timing problems are each one error at its path (issue 18 item 5)."""
    assert [e.split(" (")[0] for e in errors_of({"fleet": fleet}, tmp_path)] == expected


@pytest.mark.parametrize("names, expected", [
    # a name a header cannot have (policy never sees names with '_')
    (["x_env"], ["logging.event_headers[0]: must be a header name (letters, digits and -), got 'x_env'"]),
    (["x env"], ["logging.event_headers[0]: must be a header name (letters, digits and -), got 'x env'"]),
    # headers that can carry a credential are never recorded, whatever the config says
    (["X-Env", "Authorization"], ["logging.event_headers[1]: Authorization is never recorded: it may carry a "
                                  "credential"]),
    (["x-upstream-token"], ["logging.event_headers[0]: x-upstream-token is never recorded: it may carry a credential"]),
])
def test_event_headers_are_header_names_that_cannot_carry_a_credential(tmp_path, names, expected):
    """``logging.event_headers`` names headers whose values events record for replay: each bad one is an error
    at its path (issue 18)."""
    assert errors_of({"logging": {"event_headers": names}}, tmp_path) == expected
    assert parse_config({"logging": {"event_headers": ["X-Env"]}}, base_dir=tmp_path).event_headers == ("x-env",)


def test_agent_metadata_is_read_typed_and_ranked(tmp_path):
    """owner, purpose, a trust level from the declared order, data classes and labels are read once,
    typed and frozen (issue 18 item 1)."""
    agent = {"name": "a", "owner": "team@example.com", "purpose": "triage", "trust_levels": ["low", "mid", "high"],
             "trust_level": "mid", "data_classes": ["pii"], "labels": {"team": "ops", "app.kubernetes.io/part-of": "x"}}
    meta = parse_config({"agent": agent}, base_dir=tmp_path).agent
    assert (meta.owner, meta.purpose, meta.trust_level, meta.trust_rank) == ("team@example.com", "triage", "mid", 1)
    assert meta.data_classes == ("pii",) and dict(meta.labels) == {"team": "ops", "app.kubernetes.io/part-of": "x"}
    assert parse_config({}, base_dir=tmp_path).agent.trust_levels == ("sandbox", "internal", "production")


@pytest.mark.parametrize("agent, path, message", [
    # a level that is not declared
    ({"trust_level": "root"}, "agent.trust_level", "must be one of the declared trust_levels (sandbox, internal"),
    ({"trust_levels": ["a", "a"]}, "agent.trust_levels", "must not repeat a name"),
    ({"trust_levels": ["Prod"]}, "agent.trust_levels", "names must be lowercase"),
    ({"data_classes": ["PII data"]}, "agent.data_classes", "names must be lowercase"),
    # labels are bounded: keys, values and how many
    ({"labels": {"Team": "x"}}, "agent.labels.Team", "label keys must be 1-63 lowercase"),
    ({"labels": {"team": "a b"}}, "agent.labels.team", "label values must be strings of at most 63"),
    ({"labels": {"team": 7}}, "agent.labels.team", "label values must be strings"),
    ({"labels": {f"k{i}": "v" for i in range(33)}}, "agent.labels", "must have at most 32 entries, got 33"),
    ({"owner": "o" * 257}, "agent.owner", "must be at most 256 characters"),
    ({"tier": 1}, "agent.tier", "unknown key"),
])
def test_agent_metadata_errors_name_their_path(tmp_path, agent, path, message):
    """Each malformed agent metadata value is one error at its path, saying what was expected (issue 18 item 1)."""
    errors = errors_of({"agent": agent}, tmp_path)
    assert len(errors) == 1 and errors[0].startswith(f"{path}: {message}"), errors


def inbound_raw(tmp_path: Path, forward_to: str, **extra: Any) -> dict:
    return {"agent": {"name": "a"}, "state_dir": str(tmp_path / "state"),
            "inbound": {"forward_to": forward_to}, "outbound": {"upstreams": {}}, **extra}


@pytest.mark.parametrize("case", ["forward_to-outbound", "forward_to-admin", "upstream-outbound",
                                  "approval-audience-is-inbound"])
def test_configs_that_point_the_sidecar_at_itself_are_refused(tmp_path, case):
    """forward_to naming the sidecar's own outbound or admin listener, an upstream naming the outbound listener
    (a request loop), and an approval audience that inbound tokens also carry are refused at load
    (security review 2, finding G8)."""
    raw = {
        "forward_to-outbound": inbound_raw(tmp_path, "http://127.0.0.1:17001"),
        "forward_to-admin": inbound_raw(tmp_path, "http://localhost:17000"),
        "upstream-outbound": {"agent": {"name": "a"}, "outbound": {"upstreams": {
            "loop": {"url": "http://127.0.0.1:17001/loop"}}}},
        "approval-audience-is-inbound": {
            "agent": {"name": "a"}, "outbound": {"upstreams": {}},
            "inbound": {"forward_to": "http://127.0.0.1:8080", "jwt": {"issuers": [
                {"issuer": ISSUER, "jwks_file": str(jwks_file(tmp_path)),
                 "audiences": ["billing-agent", "agent-approvals"]}]}},
            "admin": {"approvers": [{"issuer": ISSUER, "subject": "*@example.com"}]}},
    }[case]
    with pytest.raises(ConfigInvalid):
        parse_config(raw, base_dir=tmp_path)


async def test_forward_to_the_outbound_listener_is_refused_before_a_caller_can_spend_the_agents_credential(
        make_sidecar, upstream, tmp_path):
    """End to end: inbound.forward_to set to the outbound listener would re-enter an mTLS caller's request
    as the agent's own call, to reach the upstream with the agent's credential; the config is refused at
    load (security review 2, finding G8)."""
    port = free_port()
    config = config_for(upstream)
    config["outbound"]["listen"] = f"127.0.0.1:{port}"
    config["inbound"] = {"forward_to": f"http://127.0.0.1:{port}", "trust_domains": ["sidecar.local"]}
    policy = {**POLICY, "rules": [*POLICY["rules"], {
        "id": "orchestrator-anything", "direction": "inbound", "callers": [ORCHESTRATOR], "paths": ["/**"],
        "effect": "allow"}]}
    with pytest.raises(ConfigInvalid):  # refused at load: the loop never runs
        await make_sidecar(config, policy)
    assert upstream.seen == []

