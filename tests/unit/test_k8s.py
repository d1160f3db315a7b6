"""The KubeRay manifest: valid against the RayService CRD, in sync with configs/cluster.yaml,
and every replica fits a worker."""

import copy
import json

import jsonschema
import pytest
import yaml

from serve_app.config import load_app_config
from serve_app.tools.launch import load_serve_config
from tests.conftest import REPO_ROOT, ray_start_resources

# The RayService schema kept in the project and the KubeRay CRD file it is taken from
# (k8s/schema/README.md says where it comes from); the workspace's copy of the CRD, where a
# checkout has one beside it, is checked to be the same file.
SCHEMA = REPO_ROOT / "k8s" / "schema" / "rayservice-v1.json"
CRD = REPO_ROOT / "k8s" / "schema" / "ray.io_rayservices.yaml"
WORKSPACE_CRD = REPO_ROOT.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml"
MANIFEST = REPO_ROOT / "k8s" / "rayservice.yaml"
REDIS = REPO_ROOT / "k8s" / "redis.yaml"
CLUSTER = REPO_ROOT / "configs" / "cluster.yaml"



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
    return jsonschema.Draft7Validator(strict(json.loads(SCHEMA.read_text())))


def test_kept_schema_is_the_crds():
    update = _script("update_schema")
    assert json.loads(SCHEMA.read_text()) == update.v1_schema(yaml.load(CRD.read_text(), getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    if WORKSPACE_CRD.exists():
        assert WORKSPACE_CRD.read_bytes() == CRD.read_bytes()


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
     ("spec", "rayClusterConfig", "gcsFaultToleranceOptions", "redisAdress"),
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


@pytest.fixture(scope="module")
def redis_objects():
    """k8s/redis.yaml's objects by (kind, name)."""
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(REDIS.read_text()) if d}


def test_gcs_fault_tolerance_uses_the_redis_of_redis_yaml(manifest, redis_objects):
    """GCS fault tolerance is on (docs/kubernetes.md, "Head node restarts"): the head keeps its
    metadata in the Redis of k8s/redis.yaml, reached through its Service, with the password
    of its Secret, the same one the Redis pod requires."""
    cluster = manifest["spec"]["rayClusterConfig"]
    ft = cluster["gcsFaultToleranceOptions"]
    assert ft.get("backend", "redis") == "redis"
    host, port = ft["redisAddress"].rsplit(":", 1)
    service = redis_objects[("Service", host)]
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    secret = redis_objects[("Secret", ref["name"])]
    assert secret.get("stringData", secret.get("data", {})).get(ref["key"])

    (redis,) = [d for (kind, _), d in redis_objects.items() if kind == "StatefulSet"]
    template = redis["spec"]["template"]
    assert redis["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert redis["spec"]["serviceName"] == host and redis["spec"]["replicas"] == 1
    (container,) = template["spec"]["containers"]
    assert service_port["targetPort"] in [p["name"] for p in container["ports"]]
    assert {"name": "redis", "containerPort": int(port)} in container["ports"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    args = container["args"]
    option = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert option["--requirepass"] == "$(REDIS_PASSWORD)" and refs["REDIS_PASSWORD"] == ref
    # Kept on disk: an append-only file on a PersistentVolumeClaim.
    assert option["--appendonly"] == "yes"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": option["--dir"]} in container["volumeMounts"]

    # KubeRay refuses these beside gcsFaultToleranceOptions (the older way to turn it on).
    head = cluster["headGroupSpec"]
    assert not {"redis-password", "redis-username"} & set(head["rayStartParams"])
    env = {e["name"] for c in head["template"]["spec"]["containers"] for e in c.get("env", [])}
    assert not {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "REDIS_USERNAME"} & env
    assert not {"ray.io/ft-enabled", "ray.io/external-storage-namespace"} & set(
        manifest["metadata"].get("annotations", {}))
    # Workers wait for a restarted head: KubeRay's 600 s unless a worker group sets its own.
    for group in cluster["workerGroupSpecs"]:
        env = {e["name"] for c in group["template"]["spec"]["containers"] for e in c.get("env", [])}
        assert "RAY_gcs_rpc_server_reconnect_timeout_s" not in env, group["groupName"]


def test_serve_traffic_goes_through_the_workers_only(manifest):
    """The head pod is no endpoint of the Serve Service, so a head restart cuts no request; the
    head still declares the `serve` port, from which KubeRay builds that Service's port."""
    assert manifest["spec"]["excludeHeadPodFromServeSvc"] is True
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["serve"] == load_serve_config(CLUSTER)["http_options"]["port"]
    assert load_serve_config(CLUSTER)["proxy_location"] == "EveryNode"


def test_the_serve_service_exposes_the_grpc_port(manifest):
    """Stability's gRPC API: the Serve Service carries the cluster config's gRPC port beside
    the HTTP one (as HTTP/2 cleartext), and the head declares it as KubeRay >= 1.6 reads it."""
    config = load_serve_config(CLUSTER)
    grpc_port = config["grpc_options"]["port"]
    service = {p["name"]: p for p in manifest["spec"]["serveService"]["spec"]["ports"]}
    assert service["serve-grpc"]["port"] == service["serve-grpc"]["targetPort"] == grpc_port
    assert service["serve-grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert service["serve"]["port"] == config["http_options"]["port"]
    assert manifest["spec"]["serveService"]["metadata"]["name"] == "images-serve-svc"
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["serve-grpc"] == grpc_port
    assert config["grpc_options"]["grpc_servicer_functions"] == [
        "serve_app.fronts.gooseai.generation_pb2_grpc.add_GenerationServiceServicer_to_server"]


def _script(name):
    """A script of k8s/ (not a package), loaded as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "k8s" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sync_script_is_idempotent():
    sync = _script("sync_serve_config")
    text = MANIFEST.read_text()
    assert sync.render(text, CLUSTER.read_text()) == text


def _workers(manifest):
    groups = []
    for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        params = group["rayStartParams"]
        groups.append((group["groupName"], *ray_start_resources(params)))
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
    assert any(gpus >= 1 for _, _, gpus, _ in _workers(manifest))


def test_every_replica_fits_a_worker(manifest):
    workers = _workers(manifest)
    args = load_serve_config(CLUSTER)["applications"][0]["args"]
    config = load_app_config(args)
    options = [(m.name, m.deployment) for m in config.models] + [
        ("ingress", config.ingress.deployment), ("image store", config.image_store.deployment)]
    for name, deployment in options:
        fits = [g for g, cpus, gpus, custom in workers
                if deployment.num_cpus <= cpus and deployment.num_gpus <= gpus
                and all(amount <= custom.get(key, 0) for key, amount in deployment.resources.items())]
        assert fits, f"{name} ({deployment.num_cpus} CPU, {deployment.num_gpus} GPU) fits no worker"
    # The ingress and the store stay off the GPU workers; models need a GPU.
    for name, deployment in options[-2:]:
        assert all(gpus == 0 for g, _, gpus, custom in workers
                   if set(deployment.resources) <= set(custom)), name
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
