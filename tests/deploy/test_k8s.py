"""k8s/: every kustomization renders offline, validates strictly, and keeps the promises of the issue.

Rendered with `kubectl kustomize` (no cluster), validated with `kubernetes-validate --strict` (schemas
shipped in the package). KEDA's ScaledObject has no schema there: its fields are checked here instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy.helpers import K8S, OVERLAYS, REPO, run

from services.common.settings_doc import _settings_classes, env_names

Resource = dict[str, Any]
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")
OUR_SERVICES = {"router": 8000, "classifier": 8001, "retriever": 8002, "generator": 8003}
KNOWN_SETTINGS = set().union(*(env_names(cls) for _, cls in _settings_classes()))


def of_kind(resources: list[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind]


def named(resources: list[Resource], kind: str, name: str) -> Resource:
    (found,) = [r for r in of_kind(resources, kind) if r["metadata"]["name"] == name]
    return found


def pod_spec(workload: Resource) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: Resource) -> Iterator[dict[str, Any]]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def settings_map(resources: list[Resource]) -> dict[str, str]:
    (config,) = [
        r for r in of_kind(resources, "ConfigMap") if r["metadata"]["name"].startswith("mmedrag-settings")
    ]
    return config["data"]


def container_env(resources: list[Resource], container: dict[str, Any]) -> dict[str, str | None]:
    """What the container's environment resolves to (ConfigMap first, then env; secrets as None)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            (config,) = [
                r
                for r in of_kind(resources, "ConfigMap")
                if r["metadata"]["name"] == source["configMapRef"]["name"]
            ]
            env.update(config["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env


def expand(value: str, env: dict[str, str | None]) -> str:
    """Kubernetes' $(VAR) expansion of command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: str(env.get(m.group(1), m.group(0))), value)


def flag_values(args: list[str]) -> dict[str, str]:
    values = {}
    for arg in args:
        if arg.startswith("--"):
            key, _, value = arg.partition("=")
            values[key] = value
    return values


# ---------------------------------------------------------------------------------------------- validity


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_kustomization_validates_strictly(
    rendered_text: dict[str, str], kubernetes_validate_cmd: list[str], tmp_path: Path, overlay: str
) -> None:
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(rendered_text[overlay], encoding="utf-8")
    result = run([*kubernetes_validate_cmd, "--strict", "--quiet", str(manifest)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout
    # the only kind without a schema is KEDA's
    unknown = re.findall(r"Couldn't find schema for kind (\w+)", result.stdout + result.stderr)
    assert set(unknown) <= {"ScaledObject"}


def test_tools_manifests_validate_strictly(kubernetes_validate_cmd: list[str]) -> None:
    for manifest in sorted((K8S / "tools").glob("*.yaml")):
        result = run([*kubernetes_validate_cmd, "--strict", "--quiet", str(manifest)])
        assert result.returncode == 0, result.stdout + result.stderr


def test_strict_validation_rejects_a_misspelled_field(
    rendered_text: dict[str, str], kubernetes_validate_cmd: list[str], tmp_path: Path
) -> None:
    """The validator really is strict and offline-capable on our output (not a no-op)."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(rendered_text["base"].replace("readinessProbe:", "readinesProbe:", 1), encoding="utf-8")
    result = run([*kubernetes_validate_cmd, "--strict", "--quiet", str(broken)])
    assert result.returncode != 0
    assert "readinesProbe" in result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lives_in_one_namespace(rendered: dict[str, list[Resource]], overlay: str) -> None:
    for resource in rendered[overlay]:
        if resource["kind"] == "Namespace":
            assert resource["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        else:
            assert resource["metadata"].get("namespace") == "mmedrag", resource["metadata"]["name"]
        assert resource["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mmedrag"


# ---------------------------------------------------------------------------------------------- workloads


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_have_probes_resources_and_run_unprivileged(
    rendered: dict[str, list[Resource]], overlay: str
) -> None:
    workloads = [r for r in rendered[overlay] if r["kind"] in WORKLOAD_KINDS]
    names = {r["metadata"]["name"] for r in workloads if r["kind"] == "Deployment"}
    assert names == set(OUR_SERVICES)
    for workload in workloads:
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        pod = pod_spec(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod["automountServiceAccountToken"] is False, name
        for container in containers(workload):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert security.get("privileged") is not True, name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{name}: {bound}"
            if workload["kind"] != "Job":
                assert "httpGet" in container["readinessProbe"], name
                assert "httpGet" in container["livenessProbe"], name


@pytest.mark.parametrize("overlay", ["base", "cpu"])
def test_our_services_probe_readyz_and_healthz(rendered: dict[str, list[Resource]], overlay: str) -> None:
    for name, port in OUR_SERVICES.items():
        deployment = named(rendered[overlay], "Deployment", name)
        (container,) = pod_spec(deployment)["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert container["ports"] == [{"name": "http", "containerPort": port}]
        service = named(rendered[overlay], "Service", name)
        assert service["spec"]["ports"][0]["port"] == port


def test_gpu_overlay_requests_gpus_only_for_vllm(rendered: dict[str, list[Resource]]) -> None:
    resources = rendered["gpu"]
    generator = named(resources, "Deployment", "generator")
    (container,) = pod_spec(generator)["containers"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) >= 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
    pod = pod_spec(generator)
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]
    # tensor parallelism uses exactly the GPUs of the pod
    assert flag_values(container["args"])["--tensor-parallel-size"] == str(gpus)
    for workload in (r for r in resources if r["kind"] in WORKLOAD_KINDS and r is not generator):
        for other in containers(workload):
            assert "nvidia.com/gpu" not in json.dumps(other["resources"]), workload["metadata"]["name"]


@pytest.mark.parametrize("overlay", ["base", "cpu"])
def test_cpu_stacks_request_no_gpu(rendered_text: dict[str, str], overlay: str) -> None:
    assert "nvidia.com/gpu" not in rendered_text[overlay]
    assert "vllm/vllm-openai" not in rendered_text[overlay]


def test_vllm_serves_the_exported_folder_with_its_chat_template(rendered: dict[str, list[Resource]]) -> None:
    resources = rendered["gpu"]
    (container,) = pod_spec(named(resources, "Deployment", "generator"))["containers"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", container["image"]), container["image"]
    assert container["command"] == ["vllm", "serve"]
    env = container_env(resources, container)
    args = [expand(arg, env) for arg in container["args"]]
    model_dir = args[0]
    assert model_dir == "/artifacts/generator"
    flags = flag_values(args[1:])
    assert flags["--chat-template"] == f"{model_dir}/chat_template.jinja"
    assert json.loads(flags["--limit-mm-per-prompt"]) == {"image": 1}
    assert flags["--port"] == "8003"
    assert "--allowed-local-media-path" not in flags
    assert "--allowed-media-domains" not in flags
    # the served name is the one the router asks for
    assert flags["--served-model-name"] == settings_map(resources)["MMEDRAG_ROUTER_GENERATOR_MODEL"]
    # the model folder comes from the artifacts volume, read-only
    mount = next(m for m in container["volumeMounts"] if model_dir.startswith(m["mountPath"]))
    assert mount["readOnly"] is True
    # vLLM answers /health; loading takes minutes, so a long startup probe guards the liveness probe
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_served_model_names_agree(rendered: dict[str, list[Resource]], overlay: str) -> None:
    settings = settings_map(rendered[overlay])
    assert settings["MMEDRAG_GENERATOR_SERVED_MODEL_NAME"] == settings["MMEDRAG_ROUTER_GENERATOR_MODEL"]


# ---------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_real_settings(rendered: dict[str, list[Resource]], overlay: str) -> None:
    """No dead or misspelled MMEDRAG_* variable in the ConfigMap or in any container."""
    unknown = set(settings_map(rendered[overlay])) - KNOWN_SETTINGS
    assert not unknown, sorted(unknown)
    for workload in (r for r in rendered[overlay] if r["kind"] in WORKLOAD_KINDS):
        for container in containers(workload):
            names = {item["name"] for item in container.get("env", []) if item["name"].startswith("MMEDRAG_")}
            assert names <= KNOWN_SETTINGS, sorted(names - KNOWN_SETTINGS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router_finds_its_dependencies(rendered: dict[str, list[Resource]], overlay: str) -> None:
    resources = rendered[overlay]
    settings = settings_map(resources)
    services = {s["metadata"]["name"]: s for s in of_kind(resources, "Service")}
    for variable, name in (
        ("MMEDRAG_ROUTER_CLASSIFIER_URL", "classifier"),
        ("MMEDRAG_ROUTER_RETRIEVER_URL", "retriever"),
        ("MMEDRAG_ROUTER_GENERATOR_URL", "generator"),
        ("MMEDRAG_RETRIEVER_QDRANT_URL", "qdrant"),
    ):
        match = re.fullmatch(r"http://([a-z-]+):(\d+)(/v1)?", settings[variable])
        assert match, settings[variable]
        host, port = match.group(1), int(match.group(2))
        assert host == name
        assert port in {p["port"] for p in services[name]["spec"]["ports"]}
    for service, port in OUR_SERVICES.items():
        assert settings[f"MMEDRAG_{service.upper()}_PORT"] == str(port)
        assert settings[f"MMEDRAG_{service.upper()}_HOST"] == "0.0.0.0"
    assert settings["MMEDRAG_ARTIFACTS"] == "/artifacts"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keys_come_from_a_secret_that_is_not_shipped(
    rendered: dict[str, list[Resource]], overlay: str
) -> None:
    resources = rendered[overlay]
    assert of_kind(resources, "Secret") == []
    secret_refs = {
        item["name"]: item["valueFrom"]["secretKeyRef"]
        for workload in resources
        if workload["kind"] in WORKLOAD_KINDS
        for container in containers(workload)
        for item in container.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }
    for variable in (
        "MMEDRAG_ROUTER_GENERATOR_API_KEY",
        "MMEDRAG_RETRIEVER_QDRANT_API_KEY",
        "QDRANT__SERVICE__API_KEY",
    ):
        assert secret_refs[variable]["name"] == "mmedrag-secrets"
    if overlay == "gpu":
        assert secret_refs["VLLM_API_KEY"]["key"] == secret_refs["MMEDRAG_ROUTER_GENERATOR_API_KEY"]["key"]
    else:
        assert (
            secret_refs["MMEDRAG_GENERATOR_API_KEY"]["key"]
            == secret_refs["MMEDRAG_ROUTER_GENERATOR_API_KEY"]["key"]
        )
    # no API key is ever written into the ConfigMap
    assert not [key for key in settings_map(resources) if key.endswith("API_KEY")]
    # the internal token: the same Secret key for the router and every service it calls
    for name in ("router", "classifier", "retriever", "generator"):
        (container,) = pod_spec(named(resources, "Deployment", name))["containers"]
        refs = {
            item["name"]: item["valueFrom"]["secretKeyRef"]
            for item in container.get("env", [])
            if "secretKeyRef" in item.get("valueFrom", {})
        }
        assert refs["MMEDRAG_INTERNAL_TOKEN"] == {
            "name": "mmedrag-secrets",
            "key": "internal-token",
            "optional": True,
        }, name
    assert "MMEDRAG_INTERNAL_TOKEN" not in settings_map(resources)


# ---------------------------------------------------------------------------------------------- artifacts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_artifacts_come_from_the_volume_read_only(rendered: dict[str, list[Resource]], overlay: str) -> None:
    resources = rendered[overlay]
    claim = named(resources, "PersistentVolumeClaim", "mmedrag-artifacts")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for name in ("classifier", "retriever", "generator"):
        workload = named(resources, "Deployment", name)
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        assert volumes["artifacts"]["persistentVolumeClaim"] == {
            "claimName": "mmedrag-artifacts",
            "readOnly": True,
        }
        (container,) = pod_spec(workload)["containers"]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "artifacts")
        assert mount == {"name": "artifacts", "mountPath": "/artifacts", "readOnly": True}


def test_the_gpu_overlay_has_room_for_a_7b_model(rendered: dict[str, list[Resource]]) -> None:
    claim = named(rendered["gpu"], "PersistentVolumeClaim", "mmedrag-artifacts")
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_index_job_loads_the_corpora(rendered: dict[str, list[Resource]], overlay: str) -> None:
    job = named(rendered[overlay], "Job", "mmedrag-index")
    (container,) = pod_spec(job)["containers"]
    script = " ".join(container["command"] + container["args"])
    assert "python -m mmedrag.cli index" in script
    assert '--qdrant-url "$MMEDRAG_RETRIEVER_QDRANT_URL"' in script
    assert "--artifacts /artifacts" in script
    assert "$(" not in script, "Kubernetes would try to expand $(...) in args"
    assert container_env(rendered[overlay], container)["MMEDRAG_RETRIEVER_QDRANT_URL"] == "http://qdrant:6333"
    assert pod_spec(job)["restartPolicy"] == "OnFailure"


# ---------------------------------------------------------------------------------------------- network


def peers_open_to_anyone(rule: dict[str, Any]) -> bool:
    """An ingress rule that admits traffic from outside the cluster: no `from`, or an ipBlock."""
    peers = rule.get("from")
    return not peers or any("ipBlock" in peer for peer in peers)


def selected_name(policy: Resource) -> str | None:
    return policy["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_router_is_reachable_from_outside(rendered: dict[str, list[Resource]], overlay: str) -> None:
    policies = of_kind(rendered[overlay], "NetworkPolicy")
    default_deny = named(rendered[overlay], "NetworkPolicy", "default-deny-all")
    assert default_deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    open_to_anyone = {
        selected_name(p)
        for p in policies
        for rule in p["spec"].get("ingress", [])
        if peers_open_to_anyone(rule)
    }
    assert open_to_anyone == {"router"}
    for service in of_kind(rendered[overlay], "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_retriever_and_the_indexer_reach_qdrant(
    rendered: dict[str, list[Resource]], overlay: str
) -> None:
    policies = of_kind(rendered[overlay], "NetworkPolicy")
    qdrant_ingress = [
        p for p in policies if selected_name(p) == "qdrant" and "Ingress" in p["spec"]["policyTypes"]
    ]
    allowed = {
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        for policy in qdrant_ingress
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
    }
    assert allowed == {"retriever", "indexer"}
    egress_to_qdrant = {
        selected_name(p)
        for p in policies
        for rule in p["spec"].get("egress", [])
        for peer in rule.get("to", [])
        if peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") == "qdrant"
    }
    assert egress_to_qdrant == {"retriever", "indexer"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_generator_has_no_egress(rendered: dict[str, list[Resource]], overlay: str) -> None:
    """No route out: vLLM cannot fetch a remote image URL nor reach a model hub."""
    policy = named(rendered[overlay], "NetworkPolicy", "generator")
    assert "Egress" in policy["spec"]["policyTypes"]
    assert policy["spec"]["egress"] == []
    # only DNS is open to every pod
    dns = named(rendered[overlay], "NetworkPolicy", "allow-dns")
    assert {p["port"] for rule in dns["spec"]["egress"] for p in rule["ports"]} == {53}


# ---------------------------------------------------------------------------------------------- scaling


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_for_the_stateless_services_not_the_generator(
    rendered: dict[str, list[Resource]], overlay: str
) -> None:
    resources = rendered[overlay]
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(resources, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"router", "classifier", "retriever"}
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert hpa["spec"]["minReplicas"] >= 2
        named(resources, "Deployment", name)
        # the autoscaler owns the replica count: the manifest does not fight it on every apply
        assert "replicas" not in named(resources, "Deployment", name)["spec"]
    assert "replicas" not in named(resources, "Deployment", "generator")["spec"]


@pytest.mark.parametrize(
    ("overlay", "metric"),
    [("gpu", "vllm:num_requests_waiting"), ("cpu", "mmedrag_generator_requests_waiting")],
)
def test_generator_scales_on_queue_depth(
    rendered: dict[str, list[Resource]], overlay: str, metric: str
) -> None:
    (scaled,) = of_kind(rendered[overlay], "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["metadata"]["namespace"] == "mmedrag"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "generator"}
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert metric in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) > 0
    assert trigger["metadata"]["serverAddress"].startswith("http")


def test_the_cpu_generator_exports_the_metric_it_scales_on() -> None:
    source = (REPO / "services" / "generator" / "app.py").read_text(encoding="utf-8")
    assert '"mmedrag_generator_requests_waiting"' in source


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_a_disruption_budget(rendered: dict[str, list[Resource]], overlay: str) -> None:
    budgets = {
        b["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]: b
        for b in of_kind(rendered[overlay], "PodDisruptionBudget")
    }
    assert set(budgets) == set(OUR_SERVICES)
    for deployment in of_kind(rendered[overlay], "Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert budgets[selector["app.kubernetes.io/name"]]["spec"]["selector"]["matchLabels"] == selector


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_qdrant_statefulset(rendered: dict[str, list[Resource]], overlay: str) -> None:
    statefulset = named(rendered[overlay], "StatefulSet", "qdrant")
    (container,) = pod_spec(statefulset)["containers"]
    assert re.fullmatch(r"qdrant/qdrant:v\d+\.\d+\.\d+-unprivileged", container["image"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "storage"
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/qdrant/storage", "/qdrant/snapshots"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(rendered: dict[str, list[Resource]], overlay: str) -> None:
    for workload in (r for r in rendered[overlay] if r["kind"] in WORKLOAD_KINDS):
        for container in containers(workload):
            image = container["image"]
            assert re.search(r":[\w.-]+$", image.split("/")[-1]) and not image.endswith(":latest"), image
