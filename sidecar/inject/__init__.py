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

from sidecar.inject.patch import (
    InjectRefused, PodOptions, already_injected, check_lockdown, patch_for, pod_options, pointer, wants_injection,
)
from sidecar.inject.settings import InjectSettings, load_settings, parse_settings
from sidecar.inject.webhook import build_app, main, mutate_review, parse_review, run, write_intercept_ca

__all__ = [
    "InjectRefused", "InjectSettings", "PodOptions", "already_injected", "build_app", "check_lockdown", "load_settings",
    "main", "mutate_review", "parse_review", "parse_settings", "patch_for", "pod_options", "pointer", "run",
    "wants_injection", "write_intercept_ca",
]
