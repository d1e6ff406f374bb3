"""The mutating admission webhook: puts the sidecar into pods labelled for it.

``POST /mutate`` takes an ``admission.k8s.io/v1`` AdmissionReview of a Pod. A pod labelled
``agent-sidecar.io/inject: "true"`` gets, as one RFC 6902 JSONPatch:

    initContainers  [agent-sidecar-egress]  iptables lock-down, only with egress-lockdown
                    agent-sidecar-ca        per-pod interception CA: key in the sidecar's state,
                                            certificate in a volume the agents mount read-only
                    agent-sidecar           the sidecar itself (native sidecar: restartPolicy Always)
    containers      HTTP(S)_PROXY, NO_PROXY and CA-bundle variables, the CA volume (read-only)
    volumes         agent-sidecar-*         state, CA, config, policy, SVID, signing key, token

A pod that already has a container named ``agent-sidecar`` is returned unchanged; so is any pod
without the label. Malformed reviews get HTTP 400 ``{"error": "bad_request", ...}``; pods the
webhook will not inject (bad annotation, unsafe lock-down) are refused with ``allowed: false``.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import re
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from sidecar.errors import ConfigError, ConfigInvalid

log = logging.getLogger("sidecar.inject")

Json = dict[str, Any]
Check = Callable[[object, str, list[ConfigError]], Any]

PREFIX = "agent-sidecar.io/"
INJECT_LABEL = PREFIX + "inject"
A_CONFIG, A_POLICY, A_IMAGE = PREFIX + "config", PREFIX + "policy", PREFIX + "image"
A_LOCKDOWN, A_SVID, A_KEY = PREFIX + "egress-lockdown", PREFIX + "svid-secret", PREFIX + "signing-key-secret"
A_AUDIENCE, A_INJECTED = PREFIX + "token-audience", PREFIX + "injected"
KNOWN_ANNOTATIONS = (A_CONFIG, A_POLICY, A_IMAGE, A_LOCKDOWN, A_SVID, A_KEY, A_AUDIENCE, A_INJECTED, INJECT_LABEL)
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


_QUANTITIES = _mapping({"cpu": _quantity, "memory": _quantity, "ephemeral-storage": _quantity})
_SCHEMA = _mapping({
    "image": _image, "image_pull_policy": _one_of("Always", "IfNotPresent", "Never"), "uid": _uid,
    "config_map": _name, "policy_config_map": _name, "svid_secret": _optional(_name),
    "signing_key_secret": _optional(_name), "token_audience": _optional(_audience),
    "resources": _mapping({"requests": _QUANTITIES, "limits": _QUANTITIES}),
    "egress_lockdown": _mapping({"enabled": _one_of(True, False), "image": _image}),
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


# ---------------------------------------------------------------- the pod patch

class InjectRefused(Exception):
    """A labelled pod the webhook will not admit: the message says what was expected."""


@dataclass(frozen=True, slots=True)
class PodOptions:
    """The settings after this pod's ``agent-sidecar.io/*`` annotations."""

    image: str
    config_map: str
    policy_config_map: str
    svid_secret: str | None
    signing_key_secret: str | None
    token_audience: str | None
    lockdown: bool


def wants_injection(pod: Json) -> bool:
    """Whether the pod carries ``agent-sidecar.io/inject: "true"``."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return labels.get(INJECT_LABEL) == "true"


def already_injected(pod: Json) -> bool:
    """Whether a container named ``agent-sidecar`` is already there."""
    spec = pod.get("spec") or {}
    return any(c.get("name") == SIDECAR for c in _containers(spec, "initContainers") + _containers(spec, "containers"))


def _containers(spec: Json, key: str) -> list[Json]:
    return [c for c in spec.get(key) or [] if isinstance(c, dict)]


def pod_options(settings: InjectSettings, annotations: dict[str, str]) -> PodOptions:
    """The settings as this pod's annotations override them; a bad annotation is refused."""
    unknown = sorted(k for k in annotations if k.startswith(PREFIX) and k not in KNOWN_ANNOTATIONS)
    if unknown:
        raise InjectRefused(f"inject: unknown annotation {unknown[0]}; expected one of {', '.join(KNOWN_ANNOTATIONS[:7])}")
    errors: list[ConfigError] = []
    get = lambda key, default, check: default if key not in annotations else check(annotations[key], key, errors)  # noqa: E731
    options = PodOptions(
        get(A_IMAGE, settings.image, _image), get(A_CONFIG, settings.config_map, _name),
        get(A_POLICY, settings.policy_config_map, _name), get(A_SVID, settings.svid_secret, _name),
        get(A_KEY, settings.signing_key_secret, _name), get(A_AUDIENCE, settings.token_audience, _audience),
        get(A_LOCKDOWN, settings.egress_lockdown, _one_of("true", "false")) in (True, "true"))
    if errors:
        raise InjectRefused(f"inject: annotation {errors[0]}")
    return options


def check_lockdown(spec: Json, uid: int) -> None:
    """Refuse a lock-down that would not hold: every other container must run as a known, other UID."""
    pod_uid = (spec.get("securityContext") or {}).get("runAsUser")
    for container in _containers(spec, "initContainers") + _containers(spec, "containers"):
        name, context = container.get("name"), container.get("securityContext") or {}
        run_as = context.get("runAsUser", pod_uid)
        if run_as is None:
            raise InjectRefused(f"inject: egress lock-down needs runAsUser on container {name!r} or on the pod "
                                f"(the image's USER cannot be checked here); expected a UID other than 0 and {uid}")
        if run_as in (0, uid):
            raise InjectRefused(f"inject: egress lock-down refused: container {name!r} runs as UID {run_as}; "
                                f"expected a UID other than 0 and the sidecar's {uid}, else it may open connections as the sidecar")
        if context.get("allowPrivilegeEscalation") is not False:
            raise InjectRefused(f"inject: egress lock-down needs allowPrivilegeEscalation: false on container {name!r} "
                                "(else a setuid binary could take the sidecar's UID)")


def _restricted(uid: int) -> Json:
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def _mount(name: str, path: str, read_only: bool = False) -> Json:
    return {"name": name, "mountPath": path, "readOnly": True} if read_only else {"name": name, "mountPath": path}


def _probe(path: str, period: int, failures: int) -> Json:
    return {"httpGet": {"path": path, "port": "sidecar-health"}, "periodSeconds": period,
            "timeoutSeconds": 2, "failureThreshold": failures}


def sidecar_container(settings: InjectSettings, options: PodOptions) -> Json:
    """The sidecar as a native sidecar: started before the agents, stopped after them."""
    mounts = [_mount(V_STATE, STATE_DIR), _mount(V_CA, CA_DIR), _mount(V_CONFIG, CONFIG_DIR, True),
              _mount(V_POLICY, POLICY_DIR, True), _mount(V_SVID, "/var/run/svid", True)]
    mounts += [_mount(V_KEY, "/var/run/keys", True)] if options.signing_key_secret else []
    mounts += [_mount(V_TOKEN, "/var/run/secrets/tokens", True)] if options.token_audience else []
    return {
        "name": SIDECAR, "image": options.image, "imagePullPolicy": settings.image_pull_policy,
        "args": ["run"], "restartPolicy": "Always",
        "env": [{"name": "SIDECAR_CONFIG", "value": f"{CONFIG_DIR}/sidecar.yaml"}, {"name": "TMPDIR", "value": STATE_DIR}],
        "ports": [{"name": name, "containerPort": port, "protocol": "TCP"} for name, port in PORTS],
        "startupProbe": _probe("/readyz", 2, 60), "readinessProbe": _probe("/readyz", 5, 2),
        "livenessProbe": _probe("/healthz", 10, 3),
        "resources": copy.deepcopy(settings.resources), "securityContext": _restricted(settings.uid),
        "volumeMounts": mounts,
    }


def ca_container(settings: InjectSettings, options: PodOptions) -> Json:
    """Creates the pod's interception CA: key in the sidecar's state, certificate for the agents."""
    return {"name": CA_INIT, "image": options.image, "imagePullPolicy": settings.image_pull_policy,
            "command": ["python", "-m", "sidecar.inject", "intercept-ca", STATE_DIR, CA_CERT],
            "resources": copy.deepcopy(SMALL), "securityContext": _restricted(settings.uid),
            "volumeMounts": [_mount(V_STATE, STATE_DIR), _mount(V_CA, CA_DIR)]}


def lockdown_container(settings: InjectSettings) -> Json:
    """The one container with NET_ADMIN (and NET_RAW, for iptables-legacy): installs the egress rules."""
    context = {"runAsNonRoot": False, "runAsUser": 0, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
               "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
               "seccompProfile": {"type": "RuntimeDefault"}}
    return {"name": LOCKDOWN, "image": settings.lockdown_image, "imagePullPolicy": settings.image_pull_policy,
            "command": ["/bin/sh", "-c", LOCKDOWN_SCRIPT.format(uid=settings.uid)],
            "resources": copy.deepcopy(SMALL), "securityContext": context,
            "volumeMounts": [_mount(V_XTABLES, "/run")]}


def pod_volumes(settings: InjectSettings, options: PodOptions) -> list[Json]:
    """The volumes the injected containers mount."""
    fs_group = {"spiffe.csi.cert-manager.io/fs-group": str(settings.uid)}
    svid = ({"secret": {"secretName": options.svid_secret}} if options.svid_secret else
            {"csi": {"driver": "spiffe.csi.cert-manager.io", "readOnly": True, "volumeAttributes": fs_group}})
    volumes = [{"name": V_STATE, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
               {"name": V_CA, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
               {"name": V_CONFIG, "configMap": {"name": options.config_map}},
               {"name": V_POLICY, "configMap": {"name": options.policy_config_map}}, {"name": V_SVID, **svid}]
    if options.signing_key_secret:
        volumes.append({"name": V_KEY, "secret": {"secretName": options.signing_key_secret}})
    if options.token_audience:
        token = {"audience": options.token_audience, "expirationSeconds": 3600, "path": "web-identity"}
        volumes.append({"name": V_TOKEN, "projected": {"sources": [{"serviceAccountToken": token}]}})
    if options.lockdown:
        volumes.append({"name": V_XTABLES, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
    return volumes


def pointer(*parts: str | int) -> str:
    """An RFC 6901 JSON pointer: ``~`` and ``/`` inside a part are escaped."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def _add(path: str, value: object) -> Json:
    return {"op": "add", "path": path, "value": value}


def _prepend(path: str, existing: list | None, items: list[Json]) -> list[Json]:
    if existing is None:
        return [_add(path, items)]
    return [_add(f"{path}/0", item) for item in reversed(items)]


def _append(path: str, existing: list | None, items: list[Json]) -> list[Json]:
    return [_add(path, items)] if existing is None else [_add(f"{path}/-", item) for item in items]


def _agent_ops(path: str, container: Json) -> list[Json]:
    """Proxy and CA variables (replacing the container's own values) and the CA mount, read-only."""
    env = container.get("env")
    if env is None:
        ops = [_add(f"{path}/env", list(AGENT_ENV))]
    else:
        names = [var.get("name") for var in env]
        ops = [{"op": "replace", "path": f"{path}/env/{names.index(var['name'])}", "value": var}
               if var["name"] in names else _add(f"{path}/env/-", var) for var in AGENT_ENV]
    return ops + _append(f"{path}/volumeMounts", container.get("volumeMounts"), [_mount(V_CA, CA_DIR, True)])


def _annotation_ops(meta: Json | None, wanted: dict[str, str]) -> list[Json]:
    if meta is None:
        return [_add("/metadata", {"annotations": wanted})]
    if meta.get("annotations") is None:
        return [_add("/metadata/annotations", wanted)]
    return [_add(pointer("metadata", "annotations", key), value) for key, value in wanted.items()]


def _check_names(spec: Json) -> None:
    ours = {SIDECAR, CA_INIT, LOCKDOWN, V_STATE, V_CA, V_CONFIG, V_POLICY, V_SVID, V_KEY, V_TOKEN, V_XTABLES}
    taken = [item.get("name") for key in ("initContainers", "containers", "volumes") for item in spec.get(key) or []]
    clash = sorted(ours.intersection(taken))
    if clash:
        raise InjectRefused(f"inject: the pod already uses the name {clash[0]!r}; expected the agent-sidecar-* names to be free")


def patch_for(pod: Json, settings: InjectSettings) -> list[Json]:
    """The RFC 6902 operations that add the sidecar to ``pod``; :class:`InjectRefused` if it must not."""
    meta, spec = pod.get("metadata"), pod["spec"]
    annotations = (meta or {}).get("annotations") or {}
    options = pod_options(settings, annotations)
    _check_names(spec)
    if options.lockdown:
        check_lockdown(spec, settings.uid)
    init = [lockdown_container(settings)] if options.lockdown else []
    init += [ca_container(settings, options), sidecar_container(settings, options)]
    ops = _prepend("/spec/initContainers", spec.get("initContainers"), init)
    for index, container in enumerate(spec.get("initContainers") or []):
        ops += _agent_ops(pointer("spec", "initContainers", index + len(init)), container)
    for index, container in enumerate(spec.get("containers") or []):
        ops += _agent_ops(pointer("spec", "containers", index), container)
    ops += _append("/spec/volumes", spec.get("volumes"), pod_volumes(settings, options))
    wanted = {A_INJECTED: options.image}
    if "prometheus.io/scrape" not in annotations:
        wanted.update({"prometheus.io/scrape": "true", "prometheus.io/port": "17090", "prometheus.io/path": "/metrics"})
    return ops + _annotation_ops(meta, wanted)


# ---------------------------------------------------------------- the webhook

REVIEW_API = "admission.k8s.io/v1"
MAX_REVIEW_BYTES = 3 * 1024 * 1024  # etcd stores objects up to 1.5 MiB; reviews carry one
RELOAD_SECONDS = 30.0
SETTINGS = web.AppKey("inject_settings", InjectSettings)


class BadReview(ValueError):
    """A request body that is not an AdmissionReview v1 of a Pod."""


@dataclass(frozen=True, slots=True)
class Review:
    """The parts of an AdmissionReview request the webhook uses."""

    uid: str
    operation: str
    namespace: str
    pod: Json


def parse_review(body: bytes) -> Review:
    """The review in ``body``; :class:`BadReview` says what was expected otherwise."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadReview(f"inject: expected a JSON AdmissionReview body ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise BadReview("inject: expected a JSON object")
    if doc.get("apiVersion") != REVIEW_API or doc.get("kind") != "AdmissionReview":
        raise BadReview(f"inject: expected apiVersion {REVIEW_API} and kind AdmissionReview")
    request = doc.get("request")
    if not isinstance(request, dict):
        raise BadReview("inject: expected a request object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("inject: expected request.uid, a non-empty string")
    pod = request.get("object")
    if not isinstance(pod, dict) or pod.get("kind", "Pod") != "Pod" or _kind(request) != "Pod":
        raise BadReview("inject: expected request.object to be a Pod")
    if not isinstance(pod.get("spec"), dict) or not isinstance(pod.get("metadata", {}), dict):
        raise BadReview("inject: expected a Pod with a spec")
    return Review(uid, str(request.get("operation", "CREATE")), str(request.get("namespace", "")), pod)


def _kind(request: Json) -> str | None:
    kind = request.get("kind")
    return kind.get("kind") if isinstance(kind, dict) else None


def mutate_review(review: Review, settings: InjectSettings) -> Json:
    """The AdmissionReview response for ``review``: unchanged, patched, or refused."""
    pod, name = review.pod, _pod_name(review)
    if review.operation != "CREATE" or not wants_injection(pod):
        return {"uid": review.uid, "allowed": True}
    if already_injected(pod):
        log.info("inject: %s already has the sidecar; unchanged", name)
        return {"uid": review.uid, "allowed": True}
    try:
        ops = patch_for(pod, settings)
    except InjectRefused as exc:
        log.warning("inject: refused %s: %s", name, exc)
        status = {"status": "Failure", "code": 403, "reason": "Forbidden", "message": str(exc)}
        return {"uid": review.uid, "allowed": False, "status": status}
    log.info("inject: injected the sidecar into %s (%d patch operations)", name, len(ops))
    patch = base64.b64encode(json.dumps(ops, separators=(",", ":")).encode()).decode()
    return {"uid": review.uid, "allowed": True, "patchType": "JSONPatch", "patch": patch}


def _pod_name(review: Review) -> str:
    meta = review.pod.get("metadata") or {}
    name = meta.get("name") or f"{meta.get('generateName', '')}*"
    return f"{review.namespace or meta.get('namespace', '')}/{name}"


async def _mutate(request: web.Request) -> web.Response:
    try:
        review = parse_review(await request.read())
    except BadReview as exc:
        return web.json_response({"error": "bad_request", "message": str(exc)}, status=400)
    response = mutate_review(review, request.app[SETTINGS])
    return web.json_response({"apiVersion": REVIEW_API, "kind": "AdmissionReview", "response": response})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(settings: InjectSettings) -> web.Application:
    """The webhook application: ``POST /mutate`` and ``GET /healthz``."""
    app = web.Application(client_max_size=MAX_REVIEW_BYTES)
    app[SETTINGS] = settings
    app.router.add_post("/mutate", _mutate)
    app.router.add_get("/healthz", _healthz)
    return app


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::]:9443`` for IPv6) as a host and a port."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"inject: --listen expects HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def server_context(tls_cert: Path, tls_key: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context for the API server's calls (it presents no client certificate)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls_cert, tls_key)
    return context


def _mtimes(*paths: Path) -> tuple[float, ...]:
    try:
        return tuple(path.stat().st_mtime for path in paths)
    except OSError:
        return ()


async def _reload_certificates(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Load a renewed serving certificate (cert-manager rotates the Secret); keep the old one on error."""
    seen = _mtimes(cert, key)
    while True:
        await asyncio.sleep(RELOAD_SECONDS)
        now = _mtimes(cert, key)
        if not now or now == seen:
            continue
        try:
            context.load_cert_chain(cert, key)
            seen = now
            log.info("inject: reloaded the serving certificate %s", cert)
        except (OSError, ssl.SSLError) as exc:
            log.warning("inject: cannot reload %s, keeping the current certificate: %s", cert, exc)


async def _serve(app: web.Application, host: str, port: int, context: ssl.SSLContext,
                 tls_cert: Path, tls_key: Path) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=context, shutdown_timeout=10.0)
    await site.start()
    log.info("inject: serving https://%s:%d/mutate", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloader = asyncio.create_task(_reload_certificates(context, tls_cert, tls_key))
    try:
        await stop.wait()
    finally:
        reloader.cancel()
        await runner.cleanup()


def run(listen: str, tls_cert: Path, tls_key: Path, config: Path | None) -> int:
    """Serve the webhook until SIGTERM; 0 after a clean stop, 2 on bad settings or TLS files."""
    try:
        settings = load_settings(config)
        host, port = parse_listen(listen)
        context = server_context(tls_cert, tls_key)
    except ConfigInvalid as exc:
        print(f"inject: invalid settings in {config}:", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return 2
    except (OSError, ssl.SSLError, ValueError) as exc:
        print(f"inject: cannot start: {exc}", file=sys.stderr)
        return 2
    asyncio.run(_serve(build_app(settings), host, port, context, tls_cert, tls_key))
    return 0


def write_intercept_ca(state_dir: Path, publish: Path) -> Path:
    """Create (or keep) the interception CA in ``state_dir`` and copy its certificate to ``publish``."""
    from sidecar.identity.ca import InterceptionCA

    ca = InterceptionCA.load_or_create(None, None, state_dir)
    publish.parent.mkdir(parents=True, exist_ok=True)
    publish.write_text(ca.cert_pem)
    publish.chmod(0o644)
    return publish


def main(argv: list[str]) -> int:
    """``python -m sidecar.inject intercept-ca STATE_DIR CERT_OUT``: the injected CA init step."""
    if len(argv) != 3 or argv[0] != "intercept-ca":
        print("usage: python -m sidecar.inject intercept-ca STATE_DIR CERT_OUT", file=sys.stderr)
        return 2
    path = write_intercept_ca(Path(argv[1]), Path(argv[2]))
    print(f"inject: interception CA certificate published at {path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))
