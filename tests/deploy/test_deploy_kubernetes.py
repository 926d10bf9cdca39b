"""The Kubernetes base (deploy/kubernetes/base): renders, validates against the Kubernetes
OpenAPI schemas, and keeps the sidecar rules of DESIGN §11 (native sidecar, probes,
hardening, state on an emptyDir, config as a reloadable directory, no inline secrets)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_support import REPO, parse_duration

KUBERNETES = REPO / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
EXAMPLE = KUBERNETES / "overlays" / "example"  # the base + both optional components
# 1.29: native sidecars on by default (beta); the newest schema the package ships is the other end.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
SIDECAR = "resilience-proxy"
SECRET_NAME = "resilience-proxy-secrets"
SECRETISH = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|DATABASE_URL|CLOUDINARY_URL")


def render(base: Path) -> list[dict[str, Any]]:
    """A tiny kustomize: `resources` (files or other kustomization directories) +
    `components` + `configMapGenerator` (files) + `generatorOptions`.

    Anything else in a kustomization fails loudly, so the renderer can never silently
    disagree with `kubectl kustomize`.
    """
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text("utf-8"))
    understood = {"apiVersion", "kind", "resources", "components", "configMapGenerator",
                  "generatorOptions"}  # fmt: skip
    assert set(kustomization) <= understood, set(kustomization) - understood
    options = kustomization.get("generatorOptions", {})
    assert set(options) <= {"disableNameSuffixHash", "labels"}, options
    docs: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = base / resource
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text("utf-8")) if d]
    for generator in kustomization.get("configMapGenerator", []):
        assert set(generator) <= {"name", "files"}, generator
        # The renderer does not reimplement kustomize's name hash; the base disables it.
        assert options.get("disableNameSuffixHash") is True
        data = {}
        for entry in generator["files"]:
            key, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
            data[key or PurePosixPath(path).name] = (base / path).read_text("utf-8")
        metadata: dict[str, Any] = {"name": generator["name"]}
        if options.get("labels"):
            metadata["labels"] = dict(options["labels"])
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    for component in kustomization.get("components", []):
        path = base / component
        spec = yaml.safe_load((path / "kustomization.yaml").read_text("utf-8"))
        assert spec["kind"] == "Component", component
        docs += render(path)
    return docs


def by_name(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    return by_name(render(BASE))


@pytest.fixture(scope="module")
def with_components() -> dict[str, dict[str, Any]]:
    return by_name(render(EXAMPLE))


@pytest.fixture(scope="module")
def deployment(rendered: dict[str, dict[str, Any]]) -> dict[str, Any]:
    [deploy] = [d for d in rendered.values() if d["kind"] == "Deployment"]
    return deploy


@pytest.fixture(scope="module")
def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    [container] = [c for c in pod["initContainers"] if c["name"] == SIDECAR]
    return container


@pytest.fixture(scope="module")
def agent(pod: dict[str, Any]) -> dict[str, Any]:
    [container] = pod["containers"]
    return container


@pytest.fixture(scope="module")
def proxy_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((BASE / "proxy.yaml").read_text("utf-8"))
    return config


@pytest.fixture(scope="module")
def secret_example() -> dict[str, Any]:
    secret: dict[str, Any] = yaml.safe_load((BASE / "secret.example.yaml").read_text("utf-8"))
    return secret


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


# --- rendering and schemas ---------------------------------------------------------------


def test_base_renders_the_expected_objects(rendered: dict[str, dict[str, Any]]) -> None:
    # Core objects only: `kubectl apply -k base` works on a cluster without the Prometheus
    # Operator (a PodMonitor without its CRD makes the whole apply fail).
    assert set(rendered) == {"Deployment/agent", "ConfigMap/resilience-proxy-config"}
    assert all(d["apiVersion"] in {"v1", "apps/v1"} for d in rendered.values())
    # The Secret is an example only: applying the base must never overwrite real tokens.
    assert not any(d["kind"] == "Secret" for d in rendered.values())


def test_components_add_the_podmonitor_and_the_networkpolicy(
    rendered: dict[str, dict[str, Any]], with_components: dict[str, dict[str, Any]]
) -> None:
    assert set(with_components) == set(rendered) | {
        "PodMonitor/resilience-proxy",
        "NetworkPolicy/resilience-proxy",
    }
    for name, doc in rendered.items():
        assert with_components[name] == doc, f"a component changed {name}"
    for component in ("podmonitor", "networkpolicy"):
        spec = yaml.safe_load((KUBERNETES / "components" / component / "kustomization.yaml").read_text())
        assert (spec["apiVersion"], spec["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")


@pytest.mark.parametrize("directory", [BASE, EXAMPLE], ids=["base", "overlay-with-components"])
def test_renderer_agrees_with_kubectl_kustomize(directory: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the cross-check with real kustomize did NOT run")
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert by_name([d for d in yaml.safe_load_all(out) if d]) == by_name(render(directory))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_validate_against_the_kubernetes_schema(
    with_components: dict[str, dict[str, Any]], secret_example: dict[str, Any], version: str
) -> None:
    checked = []
    for doc in [*with_components.values(), secret_example]:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in kubernetes-validate; its shape is checked below
        kubernetes_validate.validate(doc, version, strict=True)
        checked.append(doc["kind"])
    assert sorted(checked) == ["ConfigMap", "Deployment", "NetworkPolicy", "Secret"]


def test_schema_validation_catches_a_misspelt_field(deployment: dict[str, Any]) -> None:
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_podmonitor_scrapes_the_sidecar_admin_port(
    with_components: dict[str, dict[str, Any]], deployment: dict[str, Any], sidecar: dict[str, Any]
) -> None:
    monitor = with_components["PodMonitor/resilience-proxy"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items(), "the PodMonitor must select the agent pods"
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in sidecar["ports"]}


def test_networkpolicy_admits_only_prometheus_to_the_admin_port(
    with_components: dict[str, dict[str, Any]],
    deployment: dict[str, Any],
    sidecar: dict[str, Any],
    proxy_config: dict[str, Any],
) -> None:
    policy = with_components["NetworkPolicy/resilience-proxy"]["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]  # everything else, the proxy listener included, is denied
    ports = {(p["protocol"], p["port"]) for p in rule["ports"]}
    admin_port = host_port(proxy_config["admin"]["listen"])[1]
    assert ports == {("TCP", admin_port)}
    assert admin_port in {p["containerPort"] for p in sidecar["ports"]}
    assert host_port(proxy_config["listen"])[1] not in {port for _, port in ports}
    [source] = rule["from"]
    assert source["namespaceSelector"]["matchLabels"] and source["podSelector"]["matchLabels"]


def test_scrape_annotations_point_at_the_admin_listener(
    deployment: dict[str, Any], proxy_config: dict[str, Any]
) -> None:
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == host_port(proxy_config["admin"]["listen"])[1]


# --- the sidecar -------------------------------------------------------------------------


def test_proxy_is_a_native_sidecar_that_starts_before_the_agent(pod: dict[str, Any]) -> None:
    first = pod["initContainers"][0]
    assert first["name"] == SIDECAR
    assert first["restartPolicy"] == "Always"
    assert SIDECAR not in {c["name"] for c in pod["containers"]}


def test_image_tag_is_pinned(pod: dict[str, Any]) -> None:
    for container in pod["initContainers"] + pod["containers"]:
        image = container["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image


def test_probes_use_the_admin_listener(
    sidecar: dict[str, Any], proxy_config: dict[str, Any]
) -> None:
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    admin_host, admin_port = host_port(proxy_config["admin"]["listen"])
    assert admin_host == "0.0.0.0", "the kubelet probes the pod IP, not the container's loopback"
    expected = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path, probe
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert port == admin_port, probe


def test_proxy_listener_stays_on_the_pod_loopback(proxy_config: dict[str, Any]) -> None:
    host, port = host_port(proxy_config["listen"])
    assert host == "127.0.0.1" and port == 8080
    assert proxy_config.get("allow_remote_clients", False) is False


def test_sidecar_is_hardened(pod: dict[str, Any], sidecar: dict[str, Any]) -> None:
    sc = sidecar["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    seccomp = sc.get("seccompProfile") or pod["securityContext"]["seccompProfile"]
    assert seccomp["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False


def test_sidecar_has_requests_and_limits(sidecar: dict[str, Any]) -> None:
    resources = sidecar["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_config_map_is_mounted_as_a_directory_for_hot_reload(
    rendered: dict[str, dict[str, Any]], pod: dict[str, Any], sidecar: dict[str, Any]
) -> None:
    config_path = PurePosixPath(env_of(sidecar)["RESILIENCE_PROXY_CONFIG"]["value"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    [mount] = [m for m in sidecar["volumeMounts"] if "configMap" in volumes[m["name"]]]
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    assert "subPathExpr" not in mount
    assert PurePosixPath(mount["mountPath"]) == config_path.parent
    config_map = rendered[f"ConfigMap/{volumes[mount['name']]['configMap']['name']}"]
    assert config_path.name in config_map["data"]
    assert config_map["data"][config_path.name] == (BASE / "proxy.yaml").read_text("utf-8")


def test_state_lives_on_an_empty_dir(pod: dict[str, Any], sidecar: dict[str, Any]) -> None:
    state = PurePosixPath(env_of(sidecar)["RESILIENCE_PROXY_STATE"]["value"])
    assert state == PurePosixPath("/var/lib/resilience-proxy/state.json")
    volumes = {v["name"]: v for v in pod["volumes"]}
    [mount] = [m for m in sidecar["volumeMounts"] if m["mountPath"] == str(state.parent)]
    assert "emptyDir" in volumes[mount["name"]]
    assert not mount.get("readOnly", False)


def test_every_writable_path_is_a_volume(pod: dict[str, Any], sidecar: dict[str, Any]) -> None:
    """readOnlyRootFilesystem: the state directory and /tmp must be mounted volumes."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {m["mountPath"] for m in sidecar["volumeMounts"] if not m.get("readOnly", False)}
    assert writable == {"/var/lib/resilience-proxy", "/tmp"}
    for mount in sidecar["volumeMounts"]:
        if mount["mountPath"] in writable:
            assert "emptyDir" in volumes[mount["name"]]


def test_grace_period_exceeds_the_drain_timeout(
    pod: dict[str, Any], proxy_config: dict[str, Any]
) -> None:
    shutdown = proxy_config["shutdown"]
    drain = parse_duration(shutdown["drain_timeout"])
    assert parse_duration(shutdown["quiet_period"]) <= drain
    # The agent stops first and the sidecar drains after it: leave room for both.
    assert pod["terminationGracePeriodSeconds"] >= drain + 15


# --- secrets -----------------------------------------------------------------------------


def test_no_secret_value_is_inline(pod: dict[str, Any]) -> None:
    for container in pod["initContainers"] + pod["containers"]:
        for name, entry in env_of(container).items():
            if SECRETISH.search(name):
                assert "value" not in entry, f"{container['name']}: {name} is inline"
                ref = entry["valueFrom"]["secretKeyRef"]
                assert ref["name"] == SECRET_NAME
            value = str(entry.get("value", ""))
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), f"credentials in {name}"


def test_secret_refs_match_the_example_secret(
    pod: dict[str, Any], secret_example: dict[str, Any]
) -> None:
    keys = set(secret_example["stringData"])
    for container in pod["initContainers"] + pod["containers"]:
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in keys, ref
                # optional: the base applies and serves before the Secret exists
                assert ref.get("optional") is True, ref


def test_example_secret_holds_only_placeholders(secret_example: dict[str, Any]) -> None:
    assert secret_example["kind"] == "Secret"
    real_token = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w+)")
    for key, value in secret_example["stringData"].items():
        assert not real_token.search(value), key
        assert re.search(r"REPLACE|API_KEY|PASSWORD", value), f"{key} is not a placeholder"


def test_sidecar_receives_every_secret_its_config_references(
    sidecar: dict[str, Any], proxy_config: dict[str, Any], secret_example: dict[str, Any]
) -> None:
    text = (BASE / "proxy.yaml").read_text("utf-8")
    referenced = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    from_secret = referenced & set(secret_example["stringData"])
    assert {"HF_TOKEN", "GITHUB_TOKEN", "RESILIENCE_PROXY_ADMIN_TOKEN", "CLOUDINARY_API_KEY",
            "CLOUDINARY_API_SECRET"} <= from_secret  # fmt: skip
    env = env_of(sidecar)
    for name in from_secret:
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name


# --- the agent's view of the sidecar -----------------------------------------------------


def test_agent_base_urls_point_at_configured_routes(
    agent: dict[str, Any], proxy_config: dict[str, Any], secret_example: dict[str, Any]
) -> None:
    host, port = host_port(proxy_config["listen"])
    prefixes = {r["match"]["path_prefix"].rstrip("/") for r in proxy_config["routes"]}
    base = re.compile(rf"^http://{re.escape(host)}:{port}(/[^?]*)$")
    env = env_of(agent)
    expected = {
        "HF_ENDPOINT": "/huggingface-hub",  # read by huggingface_hub (tests/sdk)
        "HF_BASE_URL": "/huggingface",  # conventions for the agent's own code
        "HUGGINGFACE_BASE_URL": "/huggingface",
        "GITHUB_API_URL": "/github",
    }
    # Settings no SDK reads the way the old comments claimed: never offered again.
    # (CLOUDINARY_UPLOAD_PREFIX is read only while CLOUDINARY_CLOUD_NAME is set, which the
    # agent, configured by CLOUDINARY_URL, does not set.)
    assert not {"HF_INFERENCE_ENDPOINT", "CLOUDINARY_UPLOAD_PREFIX"} & set(env)
    for name, prefix in expected.items():
        match = base.match(env[name]["value"])
        assert match, f"{name}={env[name]['value']}"
        assert match.group(1) == prefix and prefix in prefixes, name
    cloudinary_url = secret_example["stringData"]["CLOUDINARY_URL"]
    upload_prefix = cloudinary_url.partition("upload_prefix=")[2]
    assert upload_prefix == f"http://{host}:{port}/cloudinary"
    assert env["CLOUDINARY_URL"]["valueFrom"]["secretKeyRef"]["key"] == "CLOUDINARY_URL"
    # The agent holds no provider token: the sidecar injects them.
    assert not {"HF_TOKEN", "GITHUB_TOKEN", "CLOUDINARY_API_SECRET"} & set(env)


def test_routes_forward_to_the_providers_the_sdks_expect(proxy_config: dict[str, Any]) -> None:
    raw = {name: u["url"] for name, u in proxy_config["upstreams"].items()}
    # The Admin API's Basic credentials come from the environment, never from the file.
    assert raw["cloudinary"].startswith("https://${CLOUDINARY_API_KEY:-}:${CLOUDINARY_API_SECRET:-}@")
    upstreams = {name: re.sub(r"//[^/]*@", "//", url) for name, url in raw.items()}
    by_prefix = {
        r["match"]["path_prefix"]: upstreams[r["upstream"]] for r in proxy_config["routes"]
    }
    assert by_prefix == {
        "/huggingface/": "https://api-inference.huggingface.co",
        "/huggingface-hub/": "https://huggingface.co",
        "/cloudinary/": "https://api.cloudinary.com",
        "/github/": "https://api.github.com",
    }
    assert all(r.get("strip_prefix", True) for r in proxy_config["routes"])
