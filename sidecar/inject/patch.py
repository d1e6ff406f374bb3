"""The JSONPatch that injects the sidecar into one pod (RFC 6902), and the checks that may refuse it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar.errors import ConfigError
from sidecar.inject.settings import (
    AGENT_ENV, A_AUDIENCE, A_CONFIG, A_IMAGE, A_INJECTED, A_KEY, A_LOCKDOWN, A_POLICY, A_SVID, CA_CERT, CA_DIR, CA_INIT,
    CONFIG_DIR, INJECT_LABEL, KNOWN_ANNOTATIONS, LOCKDOWN, LOCKDOWN_SCRIPT, POD_ANNOTATIONS, POLICY_DIR, PORTS,
    PREFIX, SIDECAR, SMALL, STATE_DIR, V_CA, V_CONFIG, V_KEY, V_POLICY, V_STATE, V_SVID, V_TOKEN, V_XTABLES,
    InjectSettings, Json, _audience, _image, _name, _one_of,
)


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
    """Whether this webhook injected the pod already: its annotation, and our sidecar as a native sidecar.

    A pod that merely names one of its own containers ``agent-sidecar`` is not injected; it is refused
    (:func:`_check_names`), so that nobody escapes injection by picking that name.
    """
    meta = pod.get("metadata") or {}
    if A_INJECTED not in (meta.get("annotations") or {}):
        return False
    spec = pod.get("spec") or {}
    return any(c.get("name") == SIDECAR and c.get("restartPolicy") == "Always"
               for c in _containers(spec, "initContainers"))


def _containers(spec: Json, key: str) -> list[Json]:
    return [c for c in spec.get(key) or [] if isinstance(c, dict)]


def pod_options(settings: InjectSettings, annotations: dict[str, str]) -> PodOptions:
    """The settings as this pod's annotations override them; a bad annotation is refused."""
    unknown = sorted(k for k in annotations if k.startswith(PREFIX) and k not in KNOWN_ANNOTATIONS)
    if unknown:
        raise InjectRefused(f"inject: unknown annotation {unknown[0]}; expected one of {', '.join(POD_ANNOTATIONS)}")
    errors: list[ConfigError] = []
    def get(key: str, default: Any, check: Callable[[str, str, list[ConfigError]], Any]) -> Any:
        return default if key not in annotations else check(annotations[key], key, errors)

    options = PodOptions(
        get(A_IMAGE, settings.image, _image), get(A_CONFIG, settings.config_map, _name),
        get(A_POLICY, settings.policy_config_map, _name), get(A_SVID, settings.svid_secret, _name),
        get(A_KEY, settings.signing_key_secret, _name), get(A_AUDIENCE, settings.token_audience, _audience),
        get(A_LOCKDOWN, settings.egress_lockdown, _one_of("true", "false")) in (True, "true"))
    if errors:
        raise InjectRefused(f"inject: annotation {errors[0]}")
    _only_tightens(settings, options)
    return options


def _only_tightens(settings: InjectSettings, options: PodOptions) -> None:
    """A pod's annotations may tighten what the operator set, never loosen it."""
    if settings.egress_lockdown and not options.lockdown:
        raise InjectRefused(f"inject: {A_LOCKDOWN}: the webhook's settings require egress lock-down; "
                            "a pod annotation cannot turn it off")
    if options.image != settings.image and options.image not in settings.allowed_images:
        raise InjectRefused(f"inject: {A_IMAGE}: image {options.image!r} is not in the webhook's "
                            "allowed_images (it would run as the sidecar's UID)")


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


def _prepend(path: str, existing: list[Json] | None, items: list[Json]) -> list[Json]:
    if existing is None:
        return [_add(path, items)]
    return [_add(f"{path}/0", item) for item in reversed(items)]


def _append(path: str, existing: list[Json] | None, items: list[Json]) -> list[Json]:
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
