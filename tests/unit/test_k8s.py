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


# -- Who may reach what: k8s/networkpolicy.yaml, API keys, Ray's token, the two Redis ---------

NETWORK_POLICY = REPO_ROOT / "k8s" / "networkpolicy.yaml"
JOBS_REDIS = REPO_ROOT / "k8s" / "jobs-redis.yaml"
KUBERNETES_DOC = REPO_ROOT / "docs" / "kubernetes.md"


def _objects(path):
    """A manifest file's objects by (kind, name)."""
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(path.read_text()) if d}


@pytest.fixture(scope="module")
def network_policies():
    return [d for d in yaml.safe_load_all(NETWORK_POLICY.read_text()) if d]


@pytest.fixture(scope="module")
def network_policy_validator():
    """networking.k8s.io/v1 NetworkPolicy: its rules, peers and selectors as the KubeRay CRD kept
    here carries them (its `networkPolicy` embeds Kubernetes' NetworkPolicyIngressRule and
    NetworkPolicyEgressRule, generated from the same Go types), inside the object's own fields;
    unknown fields rejected."""
    crd = json.loads(SCHEMA.read_text())
    head = crd["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]["networkPolicy"][
        "properties"]["head"]["properties"]
    ingress_rule, egress_rule = head["ingressRules"]["items"], head["egressRules"]["items"]
    selector = ingress_rule["properties"]["from"]["items"]["properties"]["podSelector"]
    labels = {"type": "object", "additionalProperties": {"type": "string"}}
    schema = {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "networking.k8s.io/v1"},
            "kind": {"const": "NetworkPolicy"},
            "metadata": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"}, "labels": labels, "annotations": labels}},
            "spec": {"type": "object", "required": ["podSelector"], "properties": {
                "podSelector": selector,
                "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
                "ingress": {"type": "array", "items": ingress_rule},
                "egress": {"type": "array", "items": egress_rule}}},
        },
    }
    return jsonschema.Draft7Validator(strict(schema))


def test_network_policies_validate(network_policies, network_policy_validator):
    assert network_policies
    for policy in network_policies:
        errors = list(network_policy_validator.iter_errors(policy))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    broken = copy.deepcopy(network_policies[0])
    broken["spec"]["ingress"][0]["form"] = broken["spec"]["ingress"][0].pop("from")
    assert list(network_policy_validator.iter_errors(broken)), "a misspelt field was accepted"


def _matches(selector, labels) -> bool:
    if selector.get("matchLabels", {}).items() - labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        value, operator = labels.get(expression["key"]), expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "Exists" and value is None:
            return False
    return True


OUTSIDE = {"namespace": "elsewhere", "labels": {}}  # a client outside the cluster, or another app
OPERATOR = {"namespace": "kuberay-system", "labels": {"app.kubernetes.io/name": "kuberay-operator"}}


def admitted(policies, pod_labels, source, port) -> bool:
    """Whether ``source`` (a pod in this namespace with ``labels``, else ``namespace`` says
    where it runs) reaches ``port`` of a pod with ``pod_labels``, under Kubernetes' rules: a pod
    no policy selects is open; else some rule of a selecting policy must admit it."""
    selecting = [p for p in policies if _matches(p["spec"]["podSelector"], pod_labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and port not in [p["port"] for p in ports]:
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                same_namespace = source.get("namespace") is None
                if "namespaceSelector" in peer:
                    in_namespace = True  # {} selects every namespace; none else is used here
                else:
                    in_namespace = same_namespace
                if in_namespace and ("podSelector" not in peer or _matches(peer["podSelector"], source["labels"])):
                    if "ipBlock" not in peer:
                        return True
    return False


def _pod_labels(manifest):
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]} | {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    return {name: group["template"]["metadata"]["labels"] for name, group in groups.items()}


def test_only_the_serve_ports_are_open_from_outside(manifest, network_policies):
    """The dashboard to the KubeRay operator alone; the GCS, the Ray client and the dashboard to
    the cluster's own pods; HTTP (8000) and gRPC (9000) of the workers' proxies to anyone."""
    pods = _pod_labels(manifest)
    assert set(pods) == {"head", "cpu-workers", "gpu-workers"}
    own = {"labels": pods["cpu-workers"]}
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    for name in ("gcs-server", "client", "dashboard"):
        assert not admitted(network_policies, pods["head"], OUTSIDE, head_ports[name]), name
        assert admitted(network_policies, pods["head"], own, head_ports[name]), name
    assert admitted(network_policies, pods["head"], OPERATOR, head_ports["dashboard"])
    assert not admitted(network_policies, pods["head"], OPERATOR, head_ports["gcs-server"])
    config = load_serve_config(CLUSTER)
    serve_ports = [config["http_options"]["port"], config["grpc_options"]["port"]]
    assert serve_ports == [8000, 9000]
    for group in ("cpu-workers", "gpu-workers"):
        for port in serve_ports:
            assert admitted(network_policies, pods[group], OUTSIDE, port), (group, port)
        for port in (6379, 8265, 10001, 8080, 52365):
            assert not admitted(network_policies, pods[group], OUTSIDE, port), (group, port)
        assert admitted(network_policies, pods[group], {"labels": pods["head"]}, 52365)


def test_ray_token_auth_is_on(manifest):
    """Ray's token authentication, with a token of a Secret the docs make (KubeRay's key
    auth_token), so that the token stays the same across the clusters a RayService upgrade makes."""
    auth = manifest["spec"]["rayClusterConfig"]["authOptions"]
    assert auth["mode"] == "token"
    doc = KUBERNETES_DOC.read_text()
    assert f"kubectl create secret generic {auth['secretName']} --from-literal=auth_token=" in doc
    assert manifest["spec"]["rayClusterConfig"]["rayVersion"] >= "2.52"


def test_api_keys_come_from_a_secret_where_the_ingress_runs(manifest):
    """The keys are never in the serve config: the CPU workers (where the ingress and the jobs
    consumer run) read them from a mounted Secret the docs make; no other group gets them."""
    args = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert "api_keys" not in args["ingress"] and not args["ingress"].get("allow_anonymous")
    config = load_app_config(args)
    assert config.ingress.deployment.resources == {"cpu_node": 1}
    assert config.jobs.deployment.resources == {"cpu_node": 1}
    doc = KUBERNETES_DOC.read_text()
    for group in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        assert "SERVE_APP_API_KEYS" not in env
        if "cpu_node" not in group["rayStartParams"].get("resources", ""):
            assert "SERVE_APP_API_KEYS_FILE" not in env, group["groupName"]
            continue
        path = env["SERVE_APP_API_KEYS_FILE"]["value"]
        (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        secret = volume["secret"]
        (item,) = secret["items"]
        assert f"{mount['mountPath']}/{item['path']}" == path and not secret.get("optional")
        assert f"kubectl create secret generic {secret['secretName']} --from-literal={item['key']}=" in doc


def _redis_options(redis):
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    return {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}, container


def _bytes(size: str) -> int:
    from serve_app.config import parse_memory

    return parse_memory(size.replace("mb", "MiB").replace("gb", "GiB"))


def test_the_jobs_and_the_gcs_each_have_their_own_bounded_redis(manifest, redis_objects):
    """A client's jobs fill their own Redis, never the GCS's: each Redis has a maxmemory below
    its container's limit; the GCS's never drops a key (noeviction), the jobs' drops the records
    nearest their expiry, never the queues (volatile-ttl)."""
    jobs_objects = _objects(JOBS_REDIS)
    gcs_redis = redis_objects[("StatefulSet", "images-redis")]
    jobs_redis = jobs_objects[("StatefulSet", "images-jobs-redis")]
    for redis, policy in ((gcs_redis, "noeviction"), (jobs_redis, "volatile-ttl")):
        option, container = _redis_options(redis)
        assert option["--maxmemory-policy"] == policy
        limit = _bytes(container["resources"]["limits"]["memory"])
        assert _bytes(option["--maxmemory"]) <= 0.8 * limit
        assert option["--appendonly"] == "yes"
    # The jobs' broker is the jobs' Redis, with its own Service and password.
    config = load_app_config(load_serve_config(CLUSTER)["applications"][0]["args"])
    host = config.jobs.broker_url.rsplit("@", 1)[1].split(":")[0]
    assert host == "images-jobs-redis" and ("Service", host) in jobs_objects
    assert ("Service", host) not in redis_objects
    assert "${SERVE_APP_JOBS_REDIS_PASSWORD}" in config.jobs.broker_url
    cluster = manifest["spec"]["rayClusterConfig"]
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]
    refs = [e["valueFrom"]["secretKeyRef"] for c in containers for e in c.get("env", [])
            if e["name"] == "SERVE_APP_JOBS_REDIS_PASSWORD"]
    assert refs and all(r == {"name": "images-jobs-redis", "key": "password"} for r in refs)
    (option, container) = _redis_options(jobs_redis)
    secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}["REDIS_PASSWORD"]
    assert secret == refs[0] and ("Secret", secret["name"]) in jobs_objects
    assert cluster["gcsFaultToleranceOptions"]["redisAddress"].split(":")[0] == "images-redis"
