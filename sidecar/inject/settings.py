"""Injection settings: the defaults (`sidecar inject -c FILE`), names and paths shared by the patch and the webhook."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidecar.errors import ConfigError, ConfigInvalid

log = logging.getLogger("sidecar.inject")

Json = dict[str, Any]
Check = Callable[[object, str, list[ConfigError]], Any]

PREFIX = "agent-sidecar.io/"
INJECT_LABEL = PREFIX + "inject"
A_CONFIG, A_POLICY, A_IMAGE = PREFIX + "config", PREFIX + "policy", PREFIX + "image"
A_LOCKDOWN, A_SVID, A_KEY = PREFIX + "egress-lockdown", PREFIX + "svid-secret", PREFIX + "signing-key-secret"
A_AUDIENCE, A_INJECTED = PREFIX + "token-audience", PREFIX + "injected"
POD_ANNOTATIONS = (A_CONFIG, A_POLICY, A_IMAGE, A_LOCKDOWN, A_SVID, A_KEY, A_AUDIENCE)  # what a pod may set
KNOWN_ANNOTATIONS = (*POD_ANNOTATIONS, A_INJECTED, INJECT_LABEL)
SIDECAR, CA_INIT, LOCKDOWN = "agent-sidecar", "agent-sidecar-ca", "agent-sidecar-egress"
STATE_DIR, CA_DIR, CA_CERT = "/var/run/sidecar", "/var/run/intercept", "/var/run/intercept/ca.crt"
CONFIG_DIR, POLICY_DIR = "/etc/sidecar/config", "/etc/sidecar/policy"
PROXY, NO_PROXY = "http://127.0.0.1:17001", "localhost,127.0.0.1"
PORTS = (("sidecar-mtls", 17443), ("sidecar-health", 17021), ("sidecar-metrics", 17090))
V_STATE, V_CA, V_CONFIG, V_POLICY = "agent-sidecar-state", "agent-sidecar-ca", "agent-sidecar-config", "agent-sidecar-policy"
V_SVID, V_KEY, V_TOKEN, V_XTABLES = "agent-sidecar-svid", "agent-sidecar-key", "agent-sidecar-token", "agent-sidecar-xtables"
AGENT_ENV = tuple({"name": n, "value": v} for n, v in (
    ("HTTP_PROXY", PROXY), ("HTTPS_PROXY", PROXY), ("http_proxy", PROXY), ("https_proxy", PROXY),
    ("NO_PROXY", NO_PROXY), ("no_proxy", NO_PROXY),
    ("SSL_CERT_FILE", CA_CERT), ("REQUESTS_CA_BUNDLE", CA_CERT), ("NODE_EXTRA_CA_CERTS", CA_CERT)))
SMALL = {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}}
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
# Only the sidecar's UID may leave the pod; everyone else reaches loopback only (IPv4 and IPv6).
LOCKDOWN_SCRIPT = """set -eu
lock() {{
  "$1" -w -N AGENT_SIDECAR_EGRESS 2>/dev/null || "$1" -w -F AGENT_SIDECAR_EGRESS
  "$1" -w -A AGENT_SIDECAR_EGRESS -o lo -j RETURN
  "$1" -w -A AGENT_SIDECAR_EGRESS -m owner --uid-owner {uid} -j RETURN
  "$1" -w -A AGENT_SIDECAR_EGRESS -j REJECT
  "$1" -w -C OUTPUT -j AGENT_SIDECAR_EGRESS 2>/dev/null || "$1" -w -I OUTPUT 1 -j AGENT_SIDECAR_EGRESS
}}
lock iptables
if [ -e /proc/net/if_inet6 ]; then lock ip6tables; fi
"""


# ---------------------------------------------------------------- settings (-c FILE)

def _default_resources() -> Json:
    return {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}


@dataclass(frozen=True, slots=True)
class InjectSettings:
    """Injection defaults (``sidecar inject -c FILE``); ``agent-sidecar.io/*`` annotations override per pod."""

    image: str = "ghcr.io/agent-sidecar/sidecar:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    uid: int = 10001                               # the sidecar's UID and GID
    config_map: str = "agent-sidecar-config"       # holds sidecar.yaml, in the pod's namespace
    policy_config_map: str = "agent-sidecar-policy"  # holds policy.yaml
    svid_secret: str | None = None                 # None: csi-driver-spiffe mints the SVID
    signing_key_secret: str | None = None          # holds signing.pem, mounted at /var/run/keys
    token_audience: str | None = "sts.amazonaws.com"  # projected token for web identity; None: none
    resources: Json = field(default_factory=_default_resources)
    egress_lockdown: bool = False
    lockdown_image: str = "ghcr.io/agent-sidecar/egress-init:0.1.0"
    allowed_images: tuple[str, ...] = ()            # images a pod may pick with agent-sidecar.io/image


def _fail(errors: list[ConfigError], path: str, message: str) -> None:
    errors.append(ConfigError(path, message))


def _image(value: object, path: str, errors: list[ConfigError]) -> Any:
    if not isinstance(value, str) or not value or re.search(r"\s", value):
        _fail(errors, path, "must be an image reference without spaces")
    return value


def _name(value: object, path: str, errors: list[ConfigError]) -> Any:
    if not isinstance(value, str) or len(value) > 253 or not DNS1123.match(value):
        _fail(errors, path, "must be a Kubernetes object name (lowercase letters, digits, '-' and '.')")
    return value


def _optional(check: Check) -> Check:
    return lambda value, path, errors: None if value is None else check(value, path, errors)


def _uid(value: object, path: str, errors: list[ConfigError]) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
        _fail(errors, path, "must be a non-zero UID (an integer below 2^31)")
    return value


def _one_of(*choices: object) -> Check:
    def check(value: object, path: str, errors: list[ConfigError]) -> Any:
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            _fail(errors, path, f"must be one of {', '.join(str(c).lower() for c in choices)}")
        return value
    return check


def _audience(value: object, path: str, errors: list[ConfigError]) -> Any:
    if not isinstance(value, str) or not value.strip():
        _fail(errors, path, "must be a non-empty audience string")
    return value


def _quantity(value: object, path: str, errors: list[ConfigError]) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not QUANTITY.match(str(value)):
        _fail(errors, path, "must be a Kubernetes quantity such as 100m, 1 or 128Mi")
    return str(value)


def _mapping(table: dict[str, Check]) -> Check:
    def check(value: object, path: str, errors: list[ConfigError]) -> Any:
        if not isinstance(value, dict):
            _fail(errors, path, "must be a mapping")
            return {}
        out = {}
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in table:
                _fail(errors, sub, f"unknown key; expected one of {', '.join(table)}")
            else:
                out[key] = table[key](item, sub, errors)
        return out
    return check


def _image_list(value: object, path: str, errors: list[ConfigError]) -> Any:
    if not isinstance(value, list):
        _fail(errors, path, "must be a list of image references")
        return ()
    return tuple(_image(item, f"{path}[{i}]", errors) for i, item in enumerate(value))


_QUANTITIES = _mapping({"cpu": _quantity, "memory": _quantity, "ephemeral-storage": _quantity})
_SCHEMA = _mapping({
    "image": _image, "image_pull_policy": _one_of("Always", "IfNotPresent", "Never"), "uid": _uid,
    "config_map": _name, "policy_config_map": _name, "svid_secret": _optional(_name),
    "signing_key_secret": _optional(_name), "token_audience": _optional(_audience),
    "resources": _mapping({"requests": _QUANTITIES, "limits": _QUANTITIES}),
    "egress_lockdown": _mapping({"enabled": _one_of(True, False), "image": _image}),
    "allowed_images": _image_list,
})


def parse_settings(data: object) -> InjectSettings:
    """Settings from parsed YAML; :class:`ConfigInvalid` lists every problem with its path."""
    errors: list[ConfigError] = []
    values = _SCHEMA(data if data is not None else {}, "", errors)
    if errors:
        raise ConfigInvalid(errors)
    lockdown = values.pop("egress_lockdown", {})
    if "enabled" in lockdown:
        values["egress_lockdown"] = lockdown["enabled"]
    if "image" in lockdown:
        values["lockdown_image"] = lockdown["image"]
    return InjectSettings(**values)


def load_settings(path: Path | None) -> InjectSettings:
    """The settings in the YAML file at ``path``, or the defaults when there is none."""
    if path is None:
        return InjectSettings()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigInvalid([ConfigError("", f"inject: cannot read {path} as YAML: {exc}")]) from None
    return parse_settings(data)
