"""The KubeRay manifest: valid against the RayService CRD, in sync with configs/cluster.yaml,
and every replica fits a worker."""

import copy

import jsonschema
import pytest
import yaml

from serve_app.config import load_app_config
from serve_app.launch import load_serve_config
from tests.conftest import REPO_ROOT

CRD = REPO_ROOT.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml"
MANIFEST = REPO_ROOT / "k8s" / "rayservice.yaml"
CLUSTER = REPO_ROOT / "configs" / "cluster.yaml"

pytestmark = pytest.mark.skipif(not CRD.exists(), reason="../shared/kuberay CRD not present")


def strict(schema):
    """The CRD schema with unknown fields forbidden, as a Kubernetes API server prunes or
    rejects them (objects that preserve unknown fields stay open)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node
                    and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def validator():
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def manifest():
    return yaml.safe_load(MANIFEST.read_text())


def test_manifest_validates_against_the_crd(validator, manifest):
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")


@pytest.mark.parametrize(
    "path",
    [("spec", "rayClusterConfig", "enableInTreeAutoscalling"),
     ("spec", "rayClusterConfig", "workerGroupSpecs", 0, "maxReplica"),
     ("spec", "serveConfig"),
     ("spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0, "imagee")],
)
def test_unknown_fields_fail(validator, manifest, path):
    broken = copy.deepcopy(manifest)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = True
    assert list(validator.iter_errors(broken)), f"{path} was accepted"


def test_serve_config_is_the_cluster_config(manifest):
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    assert serve_config == load_serve_config(CLUSTER), "run: python3 k8s/sync_serve_config.py"


def test_sync_script_is_idempotent():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync", REPO_ROOT / "k8s" / "sync_serve_config.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    text = MANIFEST.read_text()
    assert sync.render(text, CLUSTER.read_text()) == text


def _workers(manifest):
    groups = []
    for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        params = group["rayStartParams"]
        groups.append((group["groupName"], float(params.get("num-cpus", 0)), float(params.get("num-gpus", 0))))
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert float(limits["cpu"]) >= float(params.get("num-cpus", 0))
        assert float(limits.get("nvidia.com/gpu", 0)) == float(params.get("num-gpus", 0))
    return groups


def test_head_is_cpu_only_and_autoscaling_is_on(manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert any(gpus >= 1 for _, _, gpus in _workers(manifest))


def test_every_replica_fits_a_worker(manifest):
    workers = _workers(manifest)
    args = load_serve_config(CLUSTER)["applications"][0]["args"]
    config = load_app_config(args)
    options = [(m.name, m.deployment) for m in config.models] + [("ingress", config.ingress.deployment)]
    for name, deployment in options:
        fits = [g for g, cpus, gpus in workers
                if deployment.num_cpus <= cpus and deployment.num_gpus <= gpus]
        assert fits, f"{name} ({deployment.num_cpus} CPU, {deployment.num_gpus} GPU) fits no worker"
    # One GPU worker holds one SDXL base or refiner replica at a time.
    assert config.model("stable-diffusion-xl").deployment.num_gpus == 1


def test_cluster_scaling_policy():
    config = load_app_config(load_serve_config(CLUSTER)["applications"][0]["args"])
    for model in config.models:
        autoscaling = model.deployment.autoscaling_config
        if model.upscale_factor:
            assert autoscaling["min_replicas"] == 0, f"{model.name} should scale to zero"
        else:
            assert autoscaling["max_replicas"] > autoscaling["min_replicas"] >= 1
