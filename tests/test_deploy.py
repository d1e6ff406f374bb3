"""The container image recipe and the Kubernetes manifests under deploy/.

Every kustomization is rendered with the real ``kubectl kustomize`` and validated with the real
``kubernetes-validate --strict`` against Kubernetes 1.29 (the first release with native sidecars
on by default). Custom resources (PodMonitor, cert-manager's Issuer and Certificate) have no schema
there and are checked by hand. Nothing here needs a cluster or a docker engine.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.29.0"
CRD_KINDS = {"PodMonitor", "Certificate", "Issuer"}
SIDECAR_UID = 10001
KUSTOMIZATIONS = sorted(str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml"))
AGENT_WORKLOADS = ["base", "examples/agent"]
Json = dict[str, Any]


@cache
def render(kustomization: str) -> str:
    """The YAML ``kubectl kustomize`` produces for ``deploy/<kustomization>``."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (needed for kubectl kustomize)")
    done = subprocess.run(["kubectl", "kustomize", str(DEPLOY / kustomization)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def resources(kustomization: str) -> list[Json]:
    return [doc for doc in yaml.safe_load_all(render(kustomization)) if doc]


def one(kustomization: str, kind: str) -> Json:
    found = [doc for doc in resources(kustomization) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {kustomization}, found {len(found)}"
    return found[0]


def containers(spec: Json) -> dict[str, Json]:
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


# ---------------------------------------------------------------- render and validate

def test_every_kustomization_is_found() -> None:
    """The base, the webhook and both examples are kustomizations."""
    assert {"base", "webhook", "examples/agent", "examples/injected"} <= set(KUSTOMIZATIONS)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_and_validates_strictly(kustomization: str, tmp_path: Path) -> None:
    """The rendered manifests pass kubernetes-validate --strict for 1.29; only CRDs lack a schema."""
    if shutil.which("kubernetes-validate") is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(render(kustomization))
    done = subprocess.run(["kubernetes-validate", "--strict", "--kubernetes-version", K8S_VERSION, str(rendered)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert not [line for line in lines if line.startswith(("ERROR", "FATAL"))]
    unvalidated = {line.split("kind ")[1].split()[0] for line in lines if line.startswith("WARN")}
    assert unvalidated <= CRD_KINDS, f"unexpected resources without a schema: {unvalidated - CRD_KINDS}"
    validated = sum(line.startswith("INFO") for line in lines)
    assert validated == sum(doc["kind"] not in CRD_KINDS for doc in resources(kustomization))


# ---------------------------------------------------------------- the agent pod

@pytest.mark.parametrize("kustomization", AGENT_WORKLOADS)
def test_sidecar_is_a_native_sidecar_with_probes(kustomization: str) -> None:
    """The sidecar is an init container with restartPolicy Always, probed on the health port 17021."""
    spec = one(kustomization, "Deployment")["spec"]["template"]["spec"]
    names = [c["name"] for c in spec["initContainers"]]
    assert names == ["agent-sidecar-ca", "agent-sidecar"], "the CA exists before the sidecar starts"
    sidecar = spec["initContainers"][1]
    assert sidecar["restartPolicy"] == "Always"
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"sidecar-mtls": 17443, "sidecar-health": 17021, "sidecar-metrics": 17090}
    probes = {kind: sidecar[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {ports[p["port"]] for p in probes.values()} == {17021}
    assert probes["startupProbe"]["path"] == probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert sidecar["resources"]["requests"] and sidecar["resources"]["limits"]["memory"]


@pytest.mark.parametrize("kustomization", AGENT_WORKLOADS)
def test_every_container_is_locked_down(kustomization: str) -> None:
    """Every container is non-root, read-only, drops all capabilities, no escalation, RuntimeDefault seccomp."""
    spec = one(kustomization, "Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    for name, container in containers(spec).items():
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, name
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["capabilities"] == {"drop": ["ALL"]}, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert container["resources"]["limits"]["memory"], name
    assert containers(spec)["agent-sidecar"]["securityContext"]["runAsUser"] == SIDECAR_UID
    assert containers(spec)["agent"]["securityContext"]["runAsUser"] != SIDECAR_UID


@pytest.mark.parametrize("kustomization", AGENT_WORKLOADS)
def test_agent_reaches_out_only_through_the_sidecar(kustomization: str) -> None:
    """The agent gets the proxy and CA variables, the CA read-only, and none of the sidecar's secrets."""
    spec = one(kustomization, "Deployment")["spec"]["template"]["spec"]
    agent = containers(spec)["agent"]
    env = {var["name"]: var["value"] for var in agent["env"]}
    assert env["HTTP_PROXY"] == env["HTTPS_PROXY"] == "http://127.0.0.1:17001"
    assert env["NO_PROXY"] == "localhost,127.0.0.1"
    assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == env["NODE_EXTRA_CA_CERTS"] == "/var/run/intercept/ca.crt"
    assert env["LISTEN_ADDRESS"].startswith("127.0.0.1:")
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    assert mounts["agent-sidecar-ca"]["readOnly"] is True
    assert not {"agent-sidecar-state", "agent-sidecar-svid", "agent-sidecar-key", "agent-sidecar-token"} & set(mounts)


@pytest.mark.parametrize("kustomization", AGENT_WORKLOADS)
def test_identity_volumes(kustomization: str) -> None:
    """SVID from csi-driver-spiffe, signing key from a Secret, a projected token for sts.amazonaws.com."""
    spec = one(kustomization, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["agent-sidecar-svid"]["csi"]["driver"] == "spiffe.csi.cert-manager.io"
    assert volumes["agent-sidecar-key"]["secret"]["secretName"].endswith("signing-key")
    token = volumes["agent-sidecar-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "sts.amazonaws.com" and token["path"] == "web-identity"
    assert volumes["agent-sidecar-state"]["emptyDir"]
    config_maps = {doc["metadata"]["name"] for doc in resources(kustomization) if doc["kind"] == "ConfigMap"}
    assert {volumes["agent-sidecar-config"]["configMap"]["name"],
            volumes["agent-sidecar-policy"]["configMap"]["name"]} <= config_maps
    service_accounts = {doc["metadata"]["name"] for doc in resources(kustomization) if doc["kind"] == "ServiceAccount"}
    assert spec["serviceAccountName"] in service_accounts


@pytest.mark.parametrize("kustomization", AGENT_WORKLOADS)
def test_config_paths_match_the_pod_mounts(kustomization: str) -> None:
    """Every file path in the sidecar.yaml ConfigMap lies under a volume the sidecar mounts."""
    spec = one(kustomization, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in containers(spec)["agent-sidecar"]["volumeMounts"]}
    config_map = next(doc for doc in resources(kustomization)
                      if doc["kind"] == "ConfigMap" and "sidecar.yaml" in doc.get("data", {}))
    config = yaml.safe_load(config_map["data"]["sidecar.yaml"])
    paths = [*config["identity"]["svid"].values(), config["identity"]["signing_key"]["file"],
             *config["outbound"]["intercept"].values(), config["admin"]["token_file"], config["state_dir"],
             config["credentials"]["aws-s3"]["source"]["token_file"], *config["policy"]["files"]]
    for path in paths:
        assert any(path == m or path.startswith(m + "/") for m in mounts), f"{path} is not on a mounted volume"
    assert config["outbound"]["listen"].startswith("127.0.0.1:")
    assert config["inbound"]["forward_to"].startswith("http://127.0.0.1:")


@pytest.mark.parametrize("kustomization", AGENT_WORKLOADS)
def test_service_and_network_policy(kustomization: str) -> None:
    """The Service exposes only the mTLS port; the NetworkPolicy admits only 17443, 17021 and 17090."""
    service = one(kustomization, "Service")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(17443, "sidecar-mtls")]
    policy = one(kustomization, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    ports = {port["port"] for rule in policy["ingress"] for port in rule["ports"]}
    assert ports == {17443, 17021, 17090}
    pod_labels = one(kustomization, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()


@pytest.mark.parametrize("kustomization", AGENT_WORKLOADS)
def test_pod_monitor_shape(kustomization: str) -> None:
    """The PodMonitor (monitoring.coreos.com/v1) selects the agent pods and scrapes sidecar-metrics."""
    monitor = one(kustomization, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    template = one(kustomization, "Deployment")["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint == {"port": "sidecar-metrics", "path": "/metrics", "scheme": "http", "interval": "30s"}
    annotations = template["metadata"]["annotations"]
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"]) == ("true", "17090")


def test_sidecar_configs_follow_the_product_format() -> None:
    """The example sidecar.yaml files load with the sidecar's own loader: only pod-only files are missing."""
    config = pytest.importorskip("sidecar.config")
    pod_only = ("file not found",)
    # While credential providers land one by one, their types may not be registered yet.
    pending = ("unknown credential type", "is not defined under credentials")
    for path in DEPLOY.rglob("sidecar.yaml"):
        try:
            config.load_config(path)
        except config.ConfigInvalid as exc:
            unexpected = [str(e) for e in exc.errors if not any(m in e.message for m in pod_only + pending)]
            assert not unexpected, f"{path.relative_to(ROOT)}: {unexpected}"


# ---------------------------------------------------------------- the webhook

def test_webhook_is_fail_closed_for_labelled_pods_only() -> None:
    """failurePolicy Fail, pod CREATE only, selected by the inject label, kube-system and itself excluded."""
    [hook] = one("webhook", "MutatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Fail" and hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["objectSelector"] == {"matchLabels": {"agent-sidecar.io/inject": "true"}}
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    [excluded] = hook["namespaceSelector"]["matchExpressions"]
    assert {"kube-system", "agent-sidecar-system"} <= set(excluded["values"]) and excluded["operator"] == "NotIn"
    assert hook["clientConfig"]["service"]["path"] == "/mutate"


def test_webhook_pieces_agree() -> None:
    """Service, serving Certificate, caBundle injection, Secret mount and the inject command line agree."""
    config = one("webhook", "MutatingWebhookConfiguration")
    service_ref = config["webhooks"][0]["clientConfig"]["service"]
    service = one("webhook", "Service")
    assert (service["metadata"]["name"], service["metadata"]["namespace"]) == (service_ref["name"], service_ref["namespace"])
    assert service_ref["port"] == service["spec"]["ports"][0]["port"]
    certificate = one("webhook", "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    namespace, name = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")
    assert (certificate["metadata"]["namespace"], certificate["metadata"]["name"]) == (namespace, name)
    assert f"{service_ref['name']}.{service_ref['namespace']}.svc" in certificate["spec"]["dnsNames"]
    assert one("webhook", "Issuer")["metadata"]["name"] == certificate["spec"]["issuerRef"]["name"]
    pod = one("webhook", "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == certificate["spec"]["secretName"]
    [injector] = pod["containers"]
    args = dict(zip(injector["args"][1::2], injector["args"][2::2]))
    assert injector["args"][0] == "inject" and args["--listen"].endswith(":9443")
    mounts = {m["name"]: m["mountPath"] for m in injector["volumeMounts"]}
    assert args["--tls-cert"] == f"{mounts['tls']}/tls.crt" and args["--tls-key"] == f"{mounts['tls']}/tls.key"
    assert args["-c"] == f"{mounts['settings']}/inject.yaml"
    assert injector["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert one("webhook", "Deployment")["spec"]["replicas"] >= 2


def test_injected_example_is_labelled_and_annotated_for_the_webhook() -> None:
    """The injected example carries the label and only annotations the webhook knows."""
    from sidecar import inject

    template = one("examples/injected", "Deployment")["spec"]["template"]
    assert template["metadata"]["labels"]["agent-sidecar.io/inject"] == "true"
    annotations = template["metadata"]["annotations"]
    options = inject.pod_options(inject.InjectSettings(), annotations)
    config_maps = {doc["metadata"]["name"] for doc in resources("examples/injected") if doc["kind"] == "ConfigMap"}
    assert {options.config_map, options.policy_config_map} <= config_maps
    inject.check_lockdown(template["spec"], SIDECAR_UID)


# ---------------------------------------------------------------- Dockerfile

def dockerfile(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            logical.append(pending.strip())
            pending = ""
    return [(entry.split(None, 1)[0].upper(), entry.split(None, 1)[1] if " " in entry else "") for entry in logical]


def instructions(name: str) -> list[str]:
    return [args for instruction, args in dockerfile() if instruction == name]


def test_dockerfile_is_multi_stage_on_slim_python() -> None:
    """A builder stage makes wheels; the runtime stage is python:3.11-slim."""
    froms = instructions("FROM")
    assert len(froms) >= 2 and froms[0].endswith(" AS builder")
    [default] = [a.split("=", 1)[1] for a in instructions("ARG") if a.startswith("PYTHON_IMAGE=")]
    assert default.startswith("python:3.11-slim")
    assert any("pip wheel" in run for run in instructions("RUN"))


def test_dockerfile_runs_as_numeric_non_root_user() -> None:
    """The last USER is a numeric, non-zero UID (runAsNonRoot can verify it)."""
    user = instructions("USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) == SIDECAR_UID


def test_dockerfile_entrypoint_signal_and_healthcheck() -> None:
    """Exec-form ENTRYPOINT/CMD, STOPSIGNAL SIGTERM, a python HEALTHCHECK on /healthz."""
    assert json.loads(instructions("ENTRYPOINT")[-1]) == ["sidecar"]
    assert json.loads(instructions("CMD")[-1]) == ["run"]
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    [health] = instructions("HEALTHCHECK")
    command = json.loads(health.split("CMD", 1)[1])
    assert command[0] == "python" and "http://127.0.0.1:17021/healthz" in command[-1]


def test_dockerfile_suits_a_read_only_root() -> None:
    """No bytecode written at runtime; state and temp files go to /var/run/sidecar (an emptyDir)."""
    env = dict(pair.split("=", 1) for args in instructions("ENV") for pair in shlex.split(args))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["TMPDIR"] == "/var/run/sidecar"
    assert env["SIDECAR_CONFIG"] == "/etc/sidecar/config/sidecar.yaml"
    exposed = {int(port) for args in instructions("EXPOSE") for port in args.split()}
    assert exposed == {17443, 17021, 17090}, "outbound (17001) and admin (17000) stay on loopback"


def test_dockerignore_keeps_what_the_build_needs() -> None:
    """The build context holds the package sources, pyproject.toml and README.md, nothing else."""
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "**"
    assert {"!pyproject.toml", "!setup.py", "!README.md", "!sidecar/**"} <= set(lines)
    copied = {args.split()[0] for args in instructions("COPY") if not args.startswith("--")}
    assert copied <= {"pyproject.toml", "sidecar"}
