"""The injection webhook, fed real AdmissionReview v1 requests over real TLS on 127.0.0.1.

There is no API server here: the test applies the returned JSONPatch itself (RFC 6902 add and
replace, the only operations the webhook emits) and validates the patched Pod against the
Kubernetes 1.29 schema with kubernetes-validate (strict).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography import x509

from sidecar import inject
from sidecar.errors import ConfigInvalid
from sidecar.inject.settings import AGENT_ENV, LOCKDOWN

K8S_VERSION = "1.29.0"
ROOT = Path(__file__).resolve().parent.parent
Json = dict[str, Any]


# ---------------------------------------------------------------- helpers

OTHER_IMAGE = "registry.internal/sidecar:0.2.0"  # in the webhook's allowed_images

def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_patch(doc: Json, ops: list[Json]) -> Json:
    """Apply RFC 6902 ``add`` and ``replace`` operations (RFC 6901 pointers) to a copy of ``doc``."""
    doc = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] in ("add", "replace"), op
        *parents, last = [_unescape(t) for t in op["path"].split("/")[1:]]
        target: Any = doc
        for token in parents:
            target = target[int(token)] if isinstance(target, list) else target[token]
        value = copy.deepcopy(op["value"])
        if isinstance(target, list):
            if op["op"] == "replace":
                target[int(last)] = value
            else:
                target.insert(len(target) if last == "-" else int(last), value)
        else:
            assert op["op"] == "add" or last in target, f"replace of a missing member: {op['path']}"
            target[last] = value
    return doc


def validate_pod(pod: Json) -> None:
    """Strict schema validation of a Pod, as kubernetes-validate does it."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def review(pod: Json, uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002", operation: str = "CREATE") -> Json:
    """An AdmissionReview v1 as the API server sends it for a pod CREATE."""
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid, "kind": gvk, "resource": gvr, "requestKind": gvk, "requestResource": gvr,
        "namespace": "agents", "operation": operation,
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:authenticated"]},
        "object": pod, "oldObject": None, "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}}}


def agent_pod(**security: Any) -> Json:
    """A pod as a ReplicaSet creates it, after defaulting and the ServiceAccount admission plugin."""
    context = {"runAsUser": 10002, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}} | security
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "billing-agent-7c9d8f-", "namespace": "agents",
                     "labels": {"app.kubernetes.io/name": "billing-agent", "agent-sidecar.io/inject": "true",
                                "pod-template-hash": "7c9d8f"},
                     "annotations": {"kubectl.kubernetes.io/default-container": "agent"},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "billing-agent-7c9d8f",
                                          "uid": "6c1a6f2e-1b5e-4d0e-9a55-0f6f3b3f8a10", "controller": True,
                                          "blockOwnerDeletion": True}]},
        "spec": {
            "serviceAccountName": "billing-agent", "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "terminationGracePeriodSeconds": 45, "schedulerName": "default-scheduler",
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "agent", "image": "ghcr.io/example/billing-agent:2.3.1", "imagePullPolicy": "IfNotPresent",
                "env": [{"name": "LISTEN_ADDRESS", "value": "127.0.0.1:8080"},
                        {"name": "HTTPS_PROXY", "value": "http://proxy.corp:3128"}],
                "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}},
                "securityContext": context,
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                                  "readOnly": True}]}],
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}],
        },
    }


def minimal_pod() -> Json:
    """A labelled pod with no initContainers, volumes, env, mounts or annotations at all."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "bare", "labels": {"agent-sidecar.io/inject": "true"}},
            "spec": {"containers": [{"name": "agent", "image": "ghcr.io/example/agent:1"}]}}


def annotated(pod: Json, **annotations: str) -> Json:
    pod = copy.deepcopy(pod)
    pod["metadata"].setdefault("annotations", {}).update({f"agent-sidecar.io/{k.replace('_', '-')}": v
                                                          for k, v in annotations.items()})
    return pod


def by_name(items: list[Json]) -> dict[str, Json]:
    return {item["name"]: item for item in items}


def env_of(container: Json) -> dict[str, str]:
    return {var["name"]: var.get("value") for var in container.get("env", [])}


# ---------------------------------------------------------------- a real TLS webhook

@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def webhook(ca: trustme.CA) -> AsyncIterator[Any]:
    """The webhook app on 127.0.0.1 (port 0) over TLS, and a client that trusts its CA."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    runner = web.AppRunner(inject.build_app(inject.InjectSettings(allowed_images=(OTHER_IMAGE,))))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context)) as session:
        yield Client(session, f"https://127.0.0.1:{port}")
    await runner.cleanup()


class Client:
    """Posts reviews to the webhook and decodes its answers."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base

    async def post(self, body: bytes | Json) -> tuple[int, Json]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.session.post(f"{self.base}/mutate", data=data,
                                     headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json()

    async def mutate(self, pod: Json) -> tuple[Json, list[Json] | None]:
        status, answer = await self.post(review(pod))
        assert status == 200
        assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
        response = answer["response"]
        if "patch" not in response:
            return response, None
        assert response["patchType"] == "JSONPatch"
        return response, json.loads(base64.b64decode(response["patch"]))


# ---------------------------------------------------------------- injection

async def test_labelled_pod_gets_a_native_sidecar(webhook: Client) -> None:
    """A labelled pod is allowed with a patch that adds the native sidecar and a valid Pod results."""
    response, ops = await webhook.mutate(agent_pod())
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002" and response["allowed"] is True
    pod = apply_patch(agent_pod(), ops)
    validate_pod(pod)
    names = [c["name"] for c in pod["spec"]["initContainers"]]
    assert names == ["agent-sidecar-ca", "agent-sidecar"]
    sidecar = pod["spec"]["initContainers"][1]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "sidecar-health"}
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["name"]: p["containerPort"] for p in sidecar["ports"]}["sidecar-health"] == 17021
    assert sidecar["securityContext"]["runAsUser"] == 10001
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True


async def test_agent_gets_proxy_env_and_read_only_ca(webhook: Client) -> None:
    """The agent's own proxy variable is replaced, the CA variables added and the CA mounted read-only."""
    _, ops = await webhook.mutate(agent_pod())
    agent = apply_patch(agent_pod(), ops)["spec"]["containers"][0]
    env = env_of(agent)
    assert env["HTTPS_PROXY"] == env["HTTP_PROXY"] == "http://127.0.0.1:17001"
    assert env["NO_PROXY"] == "localhost,127.0.0.1" and env["LISTEN_ADDRESS"] == "127.0.0.1:8080"
    assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == env["NODE_EXTRA_CA_CERTS"] == "/var/run/intercept/ca.crt"
    assert len(agent["env"]) == len(env), "no duplicate variables"
    mounts = by_name(agent["volumeMounts"])
    assert mounts["agent-sidecar-ca"] == {"name": "agent-sidecar-ca", "mountPath": "/var/run/intercept", "readOnly": True}
    assert "agent-sidecar-state" not in mounts, "the admin token and CA key stay out of the agent"


async def test_the_deploy_guide_says_which_agent_variables_are_replaced(webhook: Client) -> None:
    """Every variable the webhook replaces on an agent that already set it is named in deploy/README.md's
    paragraph on replacement, NO_PROXY first among them (issue 11 item 19)."""
    own = {"name": "NO_PROXY", "value": ".svc,.cluster.local"}
    pod = agent_pod()
    pod["spec"]["containers"][0]["env"] = [own]
    _, ops = await webhook.mutate(pod)
    env = env_of(apply_patch(pod, ops)["spec"]["containers"][0])
    assert env["NO_PROXY"] == "localhost,127.0.0.1", "replaced, not merged"
    guide = (ROOT / "deploy" / "README.md").read_text()
    paragraph = guide[guide.index("**The agent's own proxy and CA variables are replaced"):].split("\n\n")[0]
    assert [var["name"] for var in AGENT_ENV if f"`{var['name']}`" not in paragraph] == []


async def test_volumes_and_prometheus_annotations(webhook: Client) -> None:
    """The sidecar's volumes are added after the pod's own, and the pod gets prometheus.io annotations."""
    _, ops = await webhook.mutate(agent_pod())
    pod = apply_patch(agent_pod(), ops)
    volumes = by_name(pod["spec"]["volumes"])
    assert pod["spec"]["volumes"][0]["name"] == "kube-api-access-x7k2p"
    assert volumes["agent-sidecar-svid"]["csi"]["driver"] == "spiffe.csi.cert-manager.io"
    assert volumes["agent-sidecar-config"]["configMap"]["name"] == "agent-sidecar-config"
    token = volumes["agent-sidecar-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "sts.amazonaws.com"
    assert "agent-sidecar-key" not in volumes, "no signing key Secret unless one is named"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "17090" and annotations["prometheus.io/scrape"] == "true"
    assert annotations["kubectl.kubernetes.io/default-container"] == "agent"
    assert any(op["path"] == "/metadata/annotations/prometheus.io~1scrape" for op in ops), "'/' escaped as ~1"


async def test_second_pass_returns_no_patch(webhook: Client) -> None:
    """An injected pod (it has a container named agent-sidecar) is allowed unchanged."""
    _, ops = await webhook.mutate(agent_pod())
    response, again = await webhook.mutate(apply_patch(agent_pod(), ops))
    assert response["allowed"] is True and again is None and "patchType" not in response


@pytest.mark.parametrize("labels", [
    {},                                           # no label at all
    {"agent-sidecar.io/inject": "false"},         # explicitly off
    {"agent-sidecar.io/inject": "True"},          # label values are compared exactly
])
async def test_unlabelled_pod_is_untouched(webhook: Client, labels: dict[str, str]) -> None:
    """Pods without agent-sidecar.io/inject: "true" are allowed with no patch."""
    pod = agent_pod()
    pod["metadata"]["labels"] = labels
    response, ops = await webhook.mutate(pod)
    assert response == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True} and ops is None


async def test_bare_pod_gets_its_arrays_created(webhook: Client) -> None:
    """A pod with no initContainers, volumes, env, mounts or annotations gets those arrays and maps added."""
    response, ops = await webhook.mutate(minimal_pod())
    assert response["allowed"] is True
    pod = apply_patch(minimal_pod(), ops)
    validate_pod(pod)
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["agent-sidecar-ca", "agent-sidecar"]
    assert env_of(pod["spec"]["containers"][0])["HTTP_PROXY"] == "http://127.0.0.1:17001"
    assert pod["metadata"]["annotations"]["agent-sidecar.io/injected"] == inject.InjectSettings().image


async def test_sidecar_goes_before_the_pods_own_init_containers(webhook: Client) -> None:
    """The pod's init containers run after the sidecar started and also get the proxy variables."""
    pod = agent_pod()
    pod["spec"]["initContainers"] = [{"name": "fetch-model", "image": "ghcr.io/example/fetch:1",
                                      "securityContext": {"runAsUser": 10003, "allowPrivilegeEscalation": False}}]
    _, ops = await webhook.mutate(pod)
    patched = apply_patch(pod, ops)
    validate_pod(patched)
    init = patched["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["agent-sidecar-ca", "agent-sidecar", "fetch-model"]
    assert env_of(init[2])["HTTPS_PROXY"] == "http://127.0.0.1:17001"


async def test_annotations_override_the_defaults(webhook: Client) -> None:
    """agent-sidecar.io/config, /policy, /image, /svid-secret and /signing-key-secret apply per pod."""
    pod = annotated(agent_pod(), config="billing-sidecar", policy="billing-policy",
                    image=OTHER_IMAGE, svid_secret="billing-svid",
                    signing_key_secret="billing-signing-key", token_audience="api://AzureADTokenExchange")
    _, ops = await webhook.mutate(pod)
    patched = apply_patch(pod, ops)
    validate_pod(patched)
    volumes = by_name(patched["spec"]["volumes"])
    assert volumes["agent-sidecar-config"]["configMap"]["name"] == "billing-sidecar"
    assert volumes["agent-sidecar-policy"]["configMap"]["name"] == "billing-policy"
    assert volumes["agent-sidecar-svid"] == {"name": "agent-sidecar-svid", "secret": {"secretName": "billing-svid"}}
    assert volumes["agent-sidecar-key"]["secret"]["secretName"] == "billing-signing-key"
    audience = volumes["agent-sidecar-token"]["projected"]["sources"][0]["serviceAccountToken"]["audience"]
    assert audience == "api://AzureADTokenExchange"
    init = by_name(patched["spec"]["initContainers"])
    assert init["agent-sidecar"]["image"] == init["agent-sidecar-ca"]["image"] == OTHER_IMAGE
    assert "/var/run/keys" in {m["mountPath"] for m in init["agent-sidecar"]["volumeMounts"]}


@pytest.mark.parametrize("annotations, expected", [
    ({"egress-lockdwon": "true"}, "unknown annotation agent-sidecar.io/egress-lockdwon"),  # a typo is not ignored
    ({"egress-lockdown": "yes"}, "must be one of true, false"),
    ({"config": "Billing_Config"}, "agent-sidecar.io/config: must be a Kubernetes object name"),
    ({"image": "evil image"}, "must be an image reference"),
])
async def test_bad_annotations_are_refused(webhook: Client, annotations: dict[str, str], expected: str) -> None:
    """A labelled pod with an unknown or invalid agent-sidecar.io annotation is refused, not half-injected."""
    response, ops = await webhook.mutate(annotated(agent_pod(), **{k.replace("-", "_"): v for k, v in annotations.items()}))
    assert response["allowed"] is False and ops is None
    assert response["status"]["code"] == 403 and expected in response["status"]["message"]
    assert response["status"]["message"].startswith("inject: ")


# ---------------------------------------------------------------- egress lock-down

async def test_lockdown_adds_the_iptables_init_container_first(webhook: Client) -> None:
    """With egress-lockdown the first init container installs owner-match rules with NET_ADMIN, alone."""
    pod = annotated(agent_pod(), egress_lockdown="true")
    response, ops = await webhook.mutate(pod)
    assert response["allowed"] is True
    patched = apply_patch(pod, ops)
    validate_pod(patched)
    init = patched["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["agent-sidecar-egress", "agent-sidecar-ca", "agent-sidecar"]
    script = init[0]["command"][-1]
    assert "-m owner --uid-owner 10001 -j RETURN" in script and "-o lo -j RETURN" in script
    assert "-j REJECT" in script and "ip6tables" in script
    assert init[0]["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    others = init[1:] + patched["spec"]["containers"]
    assert all("add" not in (c.get("securityContext") or {}).get("capabilities", {}) for c in others)


@pytest.mark.parametrize("security, expected", [
    ({"runAsUser": 10001}, "runs as UID 10001"),                 # the sidecar's own UID: rules would not hold
    ({"runAsUser": 0}, "runs as UID 0"),                         # root may setuid to the sidecar's UID
    ({"runAsUser": None}, "needs runAsUser"),                    # the image's USER cannot be checked
    ({"allowPrivilegeEscalation": None}, "allowPrivilegeEscalation: false"),  # setuid binaries
])
async def test_lockdown_refuses_pods_it_cannot_hold(webhook: Client, security: Json, expected: str) -> None:
    """Lock-down is refused when the agent might run as the sidecar's UID."""
    pod = annotated(agent_pod(**security), egress_lockdown="true")
    context = pod["spec"]["containers"][0]["securityContext"]
    pod["spec"]["containers"][0]["securityContext"] = {k: v for k, v in context.items() if v is not None}
    response, ops = await webhook.mutate(pod)
    assert response["allowed"] is False and ops is None
    assert expected in response["status"]["message"]


async def test_lockdown_accepts_the_uid_from_the_pod_security_context(webhook: Client) -> None:
    """A runAsUser set on the pod counts for containers that set none."""
    pod = annotated(agent_pod(runAsUser=None), egress_lockdown="true")
    del pod["spec"]["containers"][0]["securityContext"]["runAsUser"]
    pod["spec"]["securityContext"]["runAsUser"] = 20000
    response, ops = await webhook.mutate(pod)
    assert response["allowed"] is True and ops


# ---------------------------------------------------------------- malformed reviews

def _with(**changes: Any) -> bytes:
    body = review(agent_pod())
    for key, value in changes.items():
        target = body["request"] if key.startswith("request_") else body
        name = key.removeprefix("request_")
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value
    return json.dumps(body).encode()


@pytest.mark.parametrize("body", [
    pytest.param(b"{not json", id="not-json"),
    pytest.param(b"\xff\xfe", id="not-utf8"),
    pytest.param(b"[]", id="json-array"),
    pytest.param(_with(apiVersion="admission.k8s.io/v1beta1"), id="v1beta1"),
    pytest.param(_with(kind="Pod"), id="wrong-kind"),
    pytest.param(_with(request=None), id="no-request"),
    pytest.param(_with(request_uid=None), id="no-uid"),
    pytest.param(_with(request_uid=""), id="empty-uid"),
    pytest.param(_with(request_object=None), id="no-object"),
    pytest.param(_with(request_object={"apiVersion": "apps/v1", "kind": "Deployment", "spec": {}}), id="deployment"),
    pytest.param(_with(request_kind={"group": "apps", "version": "v1", "kind": "Deployment"}), id="request-kind"),
])
async def test_malformed_reviews_get_400(webhook: Client, body: bytes) -> None:
    """Anything but an AdmissionReview v1 of a Pod with a uid is answered 400 bad_request in JSON."""
    status, answer = await webhook.post(body)
    assert status == 400
    assert answer["error"] == "bad_request" and answer["message"].startswith("inject: expected")


async def test_healthz(webhook: Client) -> None:
    """GET /healthz answers 200 over TLS."""
    async with webhook.session.get(f"{webhook.base}/healthz") as resp:
        assert resp.status == 200 and (await resp.json()) == {"status": "ok"}


# ---------------------------------------------------------------- pure pieces

@pytest.mark.parametrize("parts, expected", [
    (("metadata", "annotations", "prometheus.io/port"), "/metadata/annotations/prometheus.io~1port"),  # RFC 6901: / -> ~1
    (("metadata", "annotations", "a~b"), "/metadata/annotations/a~0b"),                                 # ~ -> ~0
    (("x", "~/"), "/x/~0~1"),                                                                           # ~ first, then /
    (("spec", "containers", 3), "/spec/containers/3"),
])
def test_json_pointer_escaping(parts: tuple[Any, ...], expected: str) -> None:
    """JSON pointer parts escape ~ and / as RFC 6901 says."""
    assert inject.pointer(*parts) == expected


def test_settings_report_every_error_with_its_path() -> None:
    """Unknown keys and bad values in the injection settings are all reported, each with its path."""
    with pytest.raises(ConfigInvalid) as caught:
        inject.parse_settings({"imgae": "x", "uid": 0, "resources": {"requests": {"cpu": "lots"}},
                               "egress_lockdown": {"enabled": "yes", "imag": "y"}, "config_map": "Bad_Name"})
    paths = {error.path: error.message for error in caught.value.errors}
    assert set(paths) == {"imgae", "uid", "resources.requests.cpu", "egress_lockdown.enabled",
                          "egress_lockdown.imag", "config_map"}
    assert paths["imgae"].startswith("unknown key; expected one of image,")


def test_shipped_settings_file_loads() -> None:
    """deploy/webhook/inject.yaml is valid and matches the built-in defaults."""
    settings = inject.load_settings(ROOT / "deploy/webhook/inject.yaml")
    assert settings == inject.InjectSettings()


def test_intercept_ca_is_published_without_its_key(tmp_path: Path) -> None:
    """The CA init step keeps the key in the state dir and publishes only the certificate, stably."""
    state, publish = tmp_path / "state", tmp_path / "intercept" / "ca.crt"
    inject.write_intercept_ca(state, publish)
    first = publish.read_bytes()
    cert = x509.load_pem_x509_certificate(first)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert (state / "intercept" / "ca.key").stat().st_mode & 0o077 == 0
    assert list(publish.parent.iterdir()) == [publish]
    inject.write_intercept_ca(state, publish)
    assert publish.read_bytes() == first, "a restarted init container keeps the same CA"


# ---------------------------------------------------------------- run() as the CLI calls it

def _serve(args: str) -> subprocess.Popen[str]:
    code = ("import logging, sys; from pathlib import Path; from sidecar.inject import run; "
            f"logging.basicConfig(level=logging.INFO); sys.exit(run({args}))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ | {"PYTHONPATH": str(ROOT)})


def _served_port(proc: subprocess.Popen[str]) -> int:
    """The port the webhook logged once it was listening (it was given port 0: nothing can take it first)."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # ends when the process exits
        seen.append(line)
        if "inject: serving https://127.0.0.1:" in line:
            return int(line.split("https://127.0.0.1:")[1].split("/")[0])
    pytest.fail(f"inject: the webhook exited with {proc.wait()} before listening: {''.join(seen)}")


def test_run_serves_tls_and_stops_on_sigterm(ca: trustme.CA, tmp_path: Path) -> None:
    """run() serves /healthz over TLS with the given files on the port it bound and returns 0 after SIGTERM."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    proc = _serve(f"'127.0.0.1:0', Path({str(cert)!r}), Path({str(key)!r}), None")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    try:
        port = _served_port(proc)  # listening once logged: the first connection is answered
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert tls.recv(64).startswith(b"HTTP/1.1 200")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_run_refuses_bad_settings_with_paths(tmp_path: Path) -> None:
    """run() exits 2 and prints every settings error with its path before listening."""
    settings = tmp_path / "inject.yaml"
    settings.write_text("image: ghcr.io/x/y:1\negress_lockdown: {imgae: z}\n")
    proc = _serve(f"'127.0.0.1:0', Path('/nonexistent.crt'), Path('/nonexistent.key'), Path({str(settings)!r})")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "egress_lockdown.imgae: unknown key" in err


async def test_an_image_annotation_outside_allowed_images_is_refused(webhook: Client) -> None:
    """agent-sidecar.io/image may only pick an image the operator allowed: it runs as the sidecar's UID."""
    pod = annotated(agent_pod(), image="ghcr.io/somebody/else:1")
    response, ops = await webhook.mutate(pod)
    assert response["allowed"] is False and ops is None
    assert "allowed_images" in response["status"]["message"]


# ---------------------------------------------------------------- what a pod's author cannot undo

def mutate(pod: Json, settings: inject.InjectSettings) -> Json:
    return inject.mutate_review(inject.parse_review(json.dumps(review(pod)).encode()), settings)


def patched(response: Json, key: str) -> set[str]:
    """The ``key`` member (``name``, ``image``) of every object the response's patch adds or replaces."""
    ops = json.loads(base64.b64decode(response["patch"])) if response.get("patch") else []
    found: set[str] = set()
    for op in ops:
        values = op["value"] if isinstance(op["value"], list) else [op["value"]]
        found.update(v[key] for v in values if isinstance(v, dict) and key in v)
    return found


@pytest.mark.parametrize("annotation, value", [("egress-lockdown", "false"), ("image", "ghcr.io/evil/open-proxy:1")])
def test_a_pod_annotation_cannot_undo_the_operators_egress_lockdown(annotation: str, value: str) -> None:
    """With egress_lockdown enabled in the webhook settings, the pod's author can neither turn it off per
    pod nor run any image as the sidecar's UID (the one UID the lock-down lets out of the pod)
    (security review 2, finding G9)."""
    settings = inject.InjectSettings(egress_lockdown=True)
    pod = agent_pod()
    pod["metadata"]["annotations"][f"agent-sidecar.io/{annotation}"] = value
    response = mutate(pod, settings)
    if not response["allowed"]:
        return  # refusing the pod is a safe answer too
    assert LOCKDOWN in patched(response, "name")
    assert patched(response, "image") <= {settings.image, settings.lockdown_image}


def test_a_pod_cannot_escape_injection_by_naming_a_container_agent_sidecar() -> None:
    """A labelled pod with its own container called agent-sidecar (any image) must not be admitted
    unchanged (no sidecar, no proxy variables, no lock-down) when the operator's settings require it
    (security review 2, finding G10)."""
    settings = inject.InjectSettings(egress_lockdown=True)
    pod = agent_pod()
    pod["spec"]["containers"].append({"name": "agent-sidecar", "image": "busybox:1.36", "command": ["sleep", "1d"],
                                      "securityContext": {"runAsUser": 10003, "allowPrivilegeEscalation": False}})
    response = mutate(pod, settings)
    assert not response["allowed"] or LOCKDOWN in patched(response, "name")


def test_annotation_keys_and_values_cannot_inject_patch_operations() -> None:
    """Odd annotation keys are escaped in JSON pointers and bad names are refused, so a pod cannot add its
    own ops (security review 2: a defence that held)."""
    pod = agent_pod()
    pod["metadata"]["annotations"]["x/y~z"] = '"},{"op":"remove","path":"/spec'
    response = mutate(pod, inject.InjectSettings())
    assert response["allowed"]
    ops = json.loads(base64.b64decode(response["patch"]))
    assert {op["op"] for op in ops} <= {"add", "replace"}
    assert all(not op["path"].startswith("/metadata/annotations/x") for op in ops)
    bad = copy.deepcopy(agent_pod())
    bad["metadata"]["annotations"]["agent-sidecar.io/config"] = "cm\",\"op\":\"remove"
    assert mutate(bad, inject.InjectSettings())["allowed"] is False
