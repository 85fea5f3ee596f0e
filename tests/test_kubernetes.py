"""The KubeRay deployment (k8s/), checked offline: each kustomization rendered by a real kustomize,
every manifest validated against KubeRay v1.7.0's CRDs or Kubernetes' schemas, serveConfigV2 against
Ray Serve and the app, the Serve graph against the cluster's GPUs; broken manifests must fail."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8s import render_serve_config as generator
from k8s import validate
from settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DEV, PROD, BASE, WEIGHTS = "overlays/dev-1gpu", "overlays/prod-multigpu", "base", "weights"
ZERO = "overlays/scale-to-zero"
SERVING = (DEV, PROD, BASE, ZERO)  # kustomizations with a RayService and their own generated Serve config
S3 = "overlays/prod-s3"  # prod with outputs on object storage
Doc = dict[str, Any]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    # Never skipped: the CRD is in the repository and kubectl comes with the test extras, so a
    # missing one is a broken set-up that must fail, in CI above all.
    return {name: validate.kustomize_build(K8S / name) for name in (*SERVING, S3, WEIGHTS)}


def _only(docs: list[Doc], kind: str) -> Doc:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _worker(rayservice: Doc) -> Doc:
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


def _walk(node: Any, key: str) -> Iterator[Any]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def _with_serve_config(rayservice: Doc, change) -> Doc:
    """A copy of `rayservice` whose serveConfigV2 went through `change`."""
    config = validate.serve_config(rayservice)
    change(config)
    broken = copy.deepcopy(rayservice)
    broken["spec"]["serveConfigV2"] = yaml.safe_dump(config, sort_keys=False)
    return broken


@pytest.mark.parametrize("name", [*SERVING, S3, WEIGHTS])
def test_every_manifest_validates(rendered, name):
    errors = []
    for doc in rendered[name]:
        errors += validate.rayservice_errors(doc) if doc["kind"] == "RayService" else validate.schema_errors(doc)
    assert errors == []


@pytest.mark.parametrize("name", SERVING)
def test_serve_config_comes_from_serve_config_gpu_yaml(rendered, name):
    assert validate.serve_config(_only(rendered[name], "RayService")) == generator.serve_config_for(K8S / name)


def test_generated_patches_are_current():
    assert [K8S / n for n in (BASE, DEV, PROD, ZERO)] == generator.targets()
    for kustomization in generator.targets():
        assert (kustomization / generator.GENERATED).read_text() == generator.render(kustomization), (
            "stale: run python -m k8s.render_serve_config"
        )
    with pytest.raises(ValueError, match="Denoizer"):
        generator.serve_config({"Denoizer": {"num_replicas": 2}})


def test_overlays_size_the_cluster_as_documented(rendered):
    dev, prod = (_only(rendered[n], "RayService") for n in (DEV, PROD))
    dev_worker, prod_worker = _worker(dev), _worker(prod)
    assert (dev_worker["minReplicas"], dev_worker["maxReplicas"]) == (1, 1)
    assert prod_worker["minReplicas"] == 1 < prod_worker["maxReplicas"]
    limits = [w["template"]["spec"]["containers"][0]["resources"]["limits"] for w in (dev_worker, prod_worker)]
    assert [limit["nvidia.com/gpu"] for limit in limits] == ["1", "8"]
    assert dev["spec"]["upgradeStrategy"]["type"] == "None"
    assert prod["spec"]["upgradeStrategy"]["type"] == "NewCluster"

    def max_replicas(rayservice: Doc, name: str) -> int:
        (app,) = validate.serve_config(rayservice)["applications"]
        (deployment,) = [d for d in app["deployments"] if d["name"] == name]
        return deployment["autoscaling_config"]["max_replicas"]

    assert max_replicas(prod, "Denoiser") > max_replicas(_only(rendered[BASE], "RayService"), "Denoiser")
    for rayservice in (dev, prod):
        cluster = rayservice["spec"]["rayClusterConfig"]
        assert cluster["enableInTreeAutoscaling"] is True
        options = cluster["autoscalerOptions"]
        assert options["version"] == "v2" and options["idleTimeoutSeconds"] > 0
        worker_spec = _worker(rayservice)["template"]["spec"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker_spec["tolerations"]


def test_every_stage_on_a_gpu_goes_to_zero_with_the_gpu_pods_and_the_http_entry_stays(rendered):
    """scale-to-zero: a GPU pod is only given back once nothing runs on it; the head (the proxy and
    the Ingress, serve_config.gpu.yaml's HeadOnly) stays, so a request can arrive and wait."""
    zero = _only(rendered[ZERO], "RayService")
    (app,) = validate.serve_config(zero)["applications"]
    on_gpus = [d for d in app["deployments"] if d.get("ray_actor_options", {}).get("num_gpus")]
    assert on_gpus and all(d["autoscaling_config"]["min_replicas"] == 0 for d in on_gpus)
    assert _worker(zero)["minReplicas"] == 0
    assert validate.serve_config(zero)["proxy_location"] == "HeadOnly"
    assert zero["spec"]["excludeHeadPodFromServeSvc"] is False
    (ingress,) = [d for d in app["deployments"] if d["name"] == "Ingress"]
    assert ingress["ray_actor_options"]["resources"] == {validate.HEAD_RESOURCE: 0.01}


def test_app_environment_matches_settings_volumes_and_weights_job(rendered):
    fields = {f"SRPO_{name.upper()}" for name in Settings.model_fields}
    job_script = " ".join(_only(rendered[WEIGHTS], "Job")["spec"]["template"]["spec"]["containers"][0]["args"])
    for name in (DEV, PROD):
        docs = rendered[name]
        rayservice = _only(docs, "RayService")
        pod = _worker(rayservice)["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert {n for n in env if n.startswith("SRPO_")} <= fields  # no misspelt setting
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        for var in ("SRPO_MODEL_DIR", "SRPO_TRANSFORMER_FILE", "SRPO_SAFETY_DIR"):
            path = env[var]["value"]
            assert path in job_script, f"the weights Job does not write {path}"
            mount = mounts["/models"]
            assert path.startswith("/models/") and mount["readOnly"] and claims[mount["name"]]["readOnly"]
            assert claims[mount["name"]]["claimName"] == "srpo-weights"
        assert claims[mounts[env["SRPO_STORAGE_DIR"]["value"]]["name"]]["claimName"] == "srpo-outputs"
        outputs = [d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "srpo-outputs"]
        assert outputs[0]["spec"]["accessModes"] == ["ReadWriteMany"]  # every ingress replica serves /files
        services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
        host_port = {name: f"{name}:{s['spec']['ports'][0]['port']}" for name, s in services.items()}
        # Two Redis: the queue's load or memory limit never reaches Ray's GCS fault tolerance.
        assert f"@{host_port['srpo-queue-redis']}/0" in env["SRPO_REDIS_URL"]["value"]
        gcs = rayservice["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"]
        assert gcs == host_port["srpo-redis"] != host_port["srpo-queue-redis"]
        assert "secretKeyRef" in env["SRPO_API_KEYS"]["valueFrom"]
    weights_pvc = _only(rendered[WEIGHTS], "PersistentVolumeClaim")
    assert weights_pvc["metadata"]["name"] == "srpo-weights" and weights_pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_s3_overlay_replaces_the_outputs_volume(rendered):
    prod, s3 = _only(rendered[PROD], "RayService"), _only(rendered[S3], "RayService")
    assert not [d for d in rendered[S3] if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "srpo-outputs"]
    pod = _worker(s3)["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["SRPO_STORAGE_URL"]["value"].startswith("s3://") and "SRPO_STORAGE_DIR" not in env
    assert json.loads(env["SRPO_STORAGE_OPTIONS"]["value"]) == {"client_kwargs": {"region_name": "us-east-1"}}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # optional: workload identity works without
        assert env[key]["valueFrom"]["secretKeyRef"] | {"optional": True} == env[key]["valueFrom"]["secretKeyRef"]
    assert "outputs" not in {v["name"] for v in pod["volumes"]}
    assert "outputs" not in {m["name"] for m in pod["containers"][0]["volumeMounts"]}
    # Everything else is prod's: the component changes storage only.
    prod_pod = _worker(prod)["template"]["spec"]
    assert len(pod["volumes"]) == len(prod_pod["volumes"]) - 1
    assert validate.serve_config(s3) == validate.serve_config(prod)


def test_references_resolve(rendered):
    docs_text = (ROOT / "docs" / "deploy-kubernetes.md").read_text()
    prod = rendered[PROD]
    rayservice = _only(prod, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"], _worker(rayservice)["template"]]
    monitor = _only(prod, "PodMonitor")
    for template in templates:  # the PodMonitor finds every Ray pod and its metrics port
        # KubeRay adds ray.io/is-ray-node to every Ray pod.
        labels = template["metadata"]["labels"] | {"ray.io/is-ray-node": "yes"}
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports[monitor["spec"]["podMetricsEndpoints"][0]["port"]] == 8080
    backend = _only(prod, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{rayservice['metadata']['name']}-serve-svc", "port": {"number": 8000}}
    for name in (DEV, PROD, S3, WEIGHTS):  # volumes exist, secrets are ones the guide tells operators to create
        docs = rendered[name] + (rendered[WEIGHTS] if name != WEIGHTS else [])
        claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
        assert {v["claimName"] for v in _walk(rendered[name], "persistentVolumeClaim")} <= claims
        secrets = {r["name"] for r in _walk(rendered[name], "secretKeyRef")} | set(_walk(rendered[name], "secretName"))
        for secret in secrets:
            assert f"secret generic {secret} " in docs_text or f"secret tls {secret} " in docs_text, secret


def test_image_and_ray_version_agree(rendered):
    ray_pin = next(
        d
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("ray[")
    )
    version = ray_pin.split("==")[1]
    base_image = re.search(r"^ARG RAY_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert base_image == f"rayproject/ray:{version}-py311-gpu"
    for name in (DEV, PROD):
        rayservice = _only(rendered[name], "RayService")
        assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == version
        images = set(_walk(rayservice, "image")) | set(_walk(rendered[WEIGHTS], "image"))
        assert len(images) == 1, images  # head, workers and the weights Job run one image


def test_broken_manifests_fail(rendered):
    good = _only(rendered[DEV], "RayService")

    misspelt = copy.deepcopy(good)
    head = misspelt["spec"]["rayClusterConfig"]["headGroupSpec"]
    head["rayStartParms"] = head.pop("rayStartParams")
    assert any("'rayStartParms' was unexpected" in e for e in validate.rayservice_errors(misspelt))

    bad_quantity = copy.deepcopy(good)
    _worker(bad_quantity)["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "lots"
    assert any("limits/cpu" in e for e in validate.schema_errors(bad_quantity))

    gpu_head = copy.deepcopy(good)
    gpu_head["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"] = {
        "limits": {"nvidia.com/gpu": "1"}
    }
    assert "head: must not request GPUs" in validate.cluster_errors(gpu_head)

    def denoisers(count: int):
        def change(config):
            (denoiser,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "Denoiser"]
            denoiser["autoscaling_config"]["max_replicas"] = count

        return change

    assert validate.fit_errors(_with_serve_config(good, denoisers(1))) == []
    too_many = _with_serve_config(good, denoisers(3))  # 3 x 0.5 GPU + 0.25 + 0.25 on one GPU
    assert any(e.startswith("Denoiser replica") for e in validate.rayservice_errors(too_many))

    def rename(config):
        config["applications"][0]["deployments"][0]["name"] = "Ingres"

    assert any("no such deployments ['Ingres']" in e for e in validate.serve_errors(_with_serve_config(good, rename)))

    def bad_args(config):
        config["applications"][0]["args"]["text_batch_size"] = 0

    assert any("does not build" in e for e in validate.serve_errors(_with_serve_config(good, bad_args)))

    def bad_import(config):
        config["applications"][0]["import_path"] = "deployments.app:no_such_builder"

    assert any("does not build" in e for e in validate.serve_errors(_with_serve_config(good, bad_import)))

    redis = copy.deepcopy(next(d for d in rendered[DEV] if d["kind"] == "Deployment"))
    redis["spec"]["replica"] = redis["spec"].pop("replicas")
    assert any("'replica' was unexpected" in e for e in validate.schema_errors(redis))
