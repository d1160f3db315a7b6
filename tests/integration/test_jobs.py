"""The asynchronous jobs API on both brokers: the tiny profile's embedded one (Celery's
filesystem transport) and a real Redis (a side app, on SERVE_APP_TEST_REDIS_URL's Redis, or on a
throwaway redis-server started here when one is installed): submit, poll, cancel, idempotency,
webhooks, a consumer killed mid-job, priorities."""

import base64
import io
import json
import os
import shutil
import subprocess
import time

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from serve_app.tools.launch import load_serve_config
from tests.conftest import REPO_ROOT
from tests.integration.conftest import deploy_side_app, side_app
from tests.unit.test_webhooks import Receiver, verify

pytestmark = pytest.mark.integration
REDIS_CONFIG = REPO_ROOT / "tests" / "integration" / "jobs-redis.yaml"
# The README's Redis line (tests/unit/test_ci.py checks that the README has it).
REDIS_LINE = "sudo apt-get install -y redis-server"
# The Redis app's keys, in its ingress's environment: a job is its key's alone.
REDIS_APP_ENV = {"SERVE_APP_API_KEYS": "sk-jobs-one,sk-jobs-two"}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """SERVE_APP_TEST_REDIS_URL, else a throwaway redis-server on a free port (stopped after)."""
    url = os.environ.get("SERVE_APP_TEST_REDIS_URL")
    if url:
        yield url
        return
    if shutil.which("redis-server") is None:
        pytest.skip(f"no Redis: install Debian's redis-server with the README's line, {REDIS_LINE} "
                    "(or set SERVE_APP_TEST_REDIS_URL)")
    from serve_app.tools.launch import free_port

    port, folder = free_port(), tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", str(folder)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)


@pytest.fixture(scope="module", params=["embedded", "redis"])
def http(request, base_url):
    """A client of the app under test: the session's tiny app, or the Redis side app."""
    if request.param == "embedded":
        with httpx.Client(base_url=base_url, timeout=120) as client:
            client.app_name = "images"
            yield client
        return
    url = request.getfixturevalue("redis_url")
    redis.Redis.from_url(url).flushdb()
    jobs = {**load_serve_config(REDIS_CONFIG)["applications"][0]["args"]["jobs"], "broker_url": url}
    with side_app(REDIS_CONFIG, base_url, env=REDIS_APP_ENV, jobs=jobs) as app_url, \
            httpx.Client(base_url=app_url, timeout=120,
                         headers={"Authorization": "Bearer sk-jobs-one"}) as client:
        client.app_name = "jobsredis"
        client.restart = lambda: (serve_delete("jobsredis"), deploy_side_app(REDIS_CONFIG, base_url, env=REDIS_APP_ENV,
                                                                             jobs=jobs))
        yield client


def serve_delete(name):
    from ray import serve

    serve.delete(name)

FINAL = ("succeeded", "failed", "canceled")


def tiny_secret():
    from serve_app.tools.launch import load_serve_config
    from tests.conftest import TINY_CONFIG

    return load_serve_config(TINY_CONFIG)["applications"][0]["args"]["jobs"]["webhooks"]["secret"]


def submit(http, prompt="a fox", size="256x256", steps=4, seed=5, headers=None, **extra):
    body = {"operation": "generations", **extra,
            "input": {"prompt": prompt, "size": size, "seed": seed, "num_inference_steps": steps}}
    return http.post("/v1/images/jobs", json=body, headers=headers or {})


def wait(http, job_id, timeout_s=120, until=FINAL):
    """The job once its status is in ``until``; polls through a restarting app (a 503 or a
    connection refused while its replicas come back)."""
    deadline, job = time.monotonic() + timeout_s, {"status": "unknown"}
    while time.monotonic() < deadline:
        try:
            response = http.get(f"/v1/images/jobs/{job_id}")
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code == 200:
            job = response.json()
            if job["status"] in until:
                return job
        elif response is not None and response.status_code not in (502, 503, 504):
            raise AssertionError(f"GET job {job_id}: {response.status_code} {response.text}")
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s} s")


def pixels_at(http, url):
    return np.asarray(Image.open(io.BytesIO(http.get(url).content)).convert("RGB"))


def test_a_job_runs_to_the_synchronous_routes_result(http):
    response = submit(http)
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["object"], job["operation"], job["status"]) == ("image.job", "generations", "queued")
    assert job["id"].startswith("job_") and len(job["id"]) > 20
    done = wait(http, job["id"])
    assert done["status"] == "succeeded" and done["started"] >= done["created"]
    assert done["finished"] >= done["started"] and done["error"] is None
    (item,) = done["result"]["data"]
    assert item["url"] and item["seed"] == 5  # results default to URLs
    sync = http.post("/v1/images/generations", json={"prompt": "a fox", "size": "256x256", "seed": 5,
                                                     "num_inference_steps": 4}).json()
    expected = np.asarray(Image.open(io.BytesIO(base64.b64decode(sync["data"][0]["b64_json"]))).convert("RGB"))
    assert np.array_equal(pixels_at(http, item["url"]), expected)


def test_a_job_answers_by_url_only(http):
    """A job's record is kept a day in the jobs' state store: no base64 images in it."""
    response = http.post("/v1/images/jobs", json={"operation": "generations", "input": {
        "prompt": "a fox", "size": "256x256", "response_format": "b64_json"}})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "response_format"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 120, 200)).save(buffer, format="PNG")
    response = http.post("/v1/images/jobs", data={"operation": "variations", "response_format": "b64_json"},
                         files={"image": ("in.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


def test_a_bad_request_is_a_400_at_submit_not_a_failed_job(http):
    response = submit(http, size="999x999")
    assert response.status_code == 400 and response.json()["error"]["param"] == "size"
    response = http.post("/v1/images/jobs", json={"operation": "generations", "input": {"prompt": "x"},
                                                  "priority": "urgent"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "priority"
    response = http.post("/v1/images/jobs", json={"operation": "generations",
                                                  "input": {"prompt": "x", "stream": True}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream"
    response = http.post("/v1/images/jobs", data={"operation": "paint"},
                         files={"image": ("a.png", b"x", "image/png")})
    assert response.status_code == 400 and response.json()["error"]["param"] == "operation"


def test_a_multipart_edit_job(http):
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (30, 120, 200)).save(buffer, format="PNG")
    response = http.post("/v1/images/jobs", data={"operation": "edits", "prompt": "a boat", "seed": "3",
                                                  "num_inference_steps": "4"},
                         files={"image": ("in.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 202, response.text
    done = wait(http, response.json()["id"])
    assert done["status"] == "succeeded" and done["operation"] == "edits"
    assert done["result"]["size"] == "256x256"


def blockers(http, count=2):
    """Jobs that keep the consumer's slots busy for a few seconds."""
    return [submit(http, prompt=f"blocker {i}", size="768x768", steps=100).json()["id"] for i in range(count)]


def test_cancel_a_queued_job_and_a_running_one(http):
    running = blockers(http)
    queued = submit(http, prompt="never runs").json()["id"]
    assert http.post(f"/v1/images/jobs/{queued}/cancel").json()["status"] == "canceled"
    wait(http, running[0], until=("running",))
    response = http.post(f"/v1/images/jobs/{running[0]}/cancel")
    assert response.status_code == 200
    stopped = wait(http, running[0])
    assert stopped["status"] == "canceled" and stopped["result"] is None
    for job_id in running[1:]:
        wait(http, job_id)
    time.sleep(2)  # the consumer takes the canceled job's message and drops it
    never = http.get(f"/v1/images/jobs/{queued}").json()
    assert never["status"] == "canceled" and never["started"] is None
    again = http.post(f"/v1/images/jobs/{queued}/cancel")
    assert again.status_code == 409


def test_the_same_idempotency_key_and_body_give_the_same_job(http):
    first = submit(http, seed=11, headers={"Idempotency-Key": "k-1"}).json()
    second = submit(http, seed=11, headers={"Idempotency-Key": "k-1"}).json()
    assert first["id"] == second["id"]
    other = submit(http, seed=12, headers={"Idempotency-Key": "k-1"})
    assert other.status_code == 409
    wait(http, first["id"])


def test_concurrent_submits_with_one_idempotency_key_make_one_job(http):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: submit(http, seed=31, headers={"Idempotency-Key": "k-6"}),
                                range(6)))
    assert [a.status_code for a in answers] == [202] * 6, [a.text for a in answers]
    (job_id,) = {a.json()["id"] for a in answers}
    assert wait(http, job_id)["status"] == "succeeded"


def test_an_unknown_job_is_404(http):
    response = http.get("/v1/images/jobs/job_nothing_here")
    assert response.status_code == 404 and response.json()["error"]["param"] == "id"


def test_a_webhook_signed_as_the_spec_says_after_two_failures(http):
    receiver = Receiver(answers=[500, 502])
    job = submit(http, seed=21, webhook=receiver.url).json()
    received = receiver.wait(3)
    assert len(received) == 3
    for headers, body in received:
        assert verify(tiny_secret(), headers, body)
        assert headers["webhook-id"] == received[0][0]["webhook-id"]  # one message, retried
    event = json.loads(received[-1][1])
    assert event["type"] == "image.job.succeeded" and event["data"]["id"] == job["id"]
    receiver.server.shutdown()


def test_a_webhook_to_a_host_the_config_does_not_allow_is_refused_at_submit(http):
    response = submit(http, webhook="https://hooks.example.com/x")
    assert response.status_code == 400 and response.json()["error"]["param"] == "webhook"
    response = submit(http, webhook="http://169.254.169.254/latest/meta-data")
    assert response.status_code == 400
    response = submit(http, webhook="http://127.0.0.1:81/x")  # a port the profile does not list
    assert response.status_code == 400 and "port 81" in response.json()["error"]["message"]


def test_a_consumer_killed_mid_job_leaves_the_job_to_run_again_once(http):
    import ray

    receiver = Receiver()
    job = submit(http, prompt="victim", size="768x768", steps=100, seed=4, webhook=receiver.url).json()
    wait(http, job["id"], until=("running",))
    for name in consumer_replicas(http):  # every one (the Redis app may have scaled to two)
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    done = wait(http, job["id"], timeout_s=180)
    assert done["status"] == "succeeded"
    time.sleep(3)
    assert len(receiver.wait(1)) == 1  # told once
    receiver.server.shutdown()


def consumer_replicas(http, deployment="JobsConsumer") -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{http.app_name}#{deployment}#")]


def test_a_job_outlives_its_ingress_replica(http):
    """The record is in the broker's backend, not in the ingress: a new ingress replica
    answers for the job the killed one took."""
    import ray

    job = submit(http, prompt="through an ingress restart", size="768x768", steps=60, seed=12).json()
    for name in consumer_replicas(http, "ImagesIngress"):
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    done = wait(http, job["id"], timeout_s=180)
    assert done["status"] == "succeeded" and done["created"] == job["created"]
    assert http.get(done["result"]["data"][0]["url"]).status_code == 200


def test_jobs_outlive_a_restart_of_the_whole_application(http):
    """With Redis (a durable broker: it outlives the app) a queued job and a running one both
    end well after every replica of the application went and came back."""
    if http.app_name != "jobsredis":
        pytest.skip("the session's tiny app is not restarted under the other tests; the Redis app is")
    running = submit(http, prompt="running at the restart", size="768x768", steps=100, seed=21).json()
    queued = [submit(http, prompt=f"queued at the restart {i}", seed=22 + i).json() for i in range(3)]
    wait(http, running["id"], until=("running",))
    http.restart()
    for job in (running, *queued):
        assert wait(http, job["id"], timeout_s=240)["status"] == "succeeded", job["id"]


def test_the_consumers_scale_out_on_a_backlog_and_back(http):
    if http.app_name != "jobsredis":
        pytest.skip("the tiny app runs one consumer; the Redis app autoscales its consumers")
    from ray import serve

    def running_after(until, timeout_s=60):
        """Consumer replicas running once ``until(count)`` holds, or the time is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = serve.status().applications[http.app_name].deployments["JobsConsumer"]
            count = status.replica_states.get("RUNNING", 0)
            if until(count) or time.monotonic() > deadline:
                return count
            time.sleep(0.5)

    assert running_after(lambda n: n == 1) == 1, "idle (earlier tests' jobs ended): min_replicas"
    backlog = [submit(http, prompt=f"backlog {i}", size="768x768", steps=60, seed=i).json()["id"]
               for i in range(6)]
    assert running_after(lambda n: n >= 2) == 2, "6 jobs for 2 per replica: more replicas (at most 2)"
    assert all(wait(http, job_id, timeout_s=240)["status"] == "succeeded" for job_id in backlog)
    assert running_after(lambda n: n == 1) == 1, "no job left: back to min_replicas"


def test_a_high_priority_job_runs_before_a_backlog_of_low_ones(http):
    busy = blockers(http)
    lows = [submit(http, prompt=f"low {i}", seed=i, priority="low").json()["id"] for i in range(4)]
    high = submit(http, prompt="high", seed=9, priority="high").json()["id"]
    # The low jobs still queued behind it (on Redis the consumers autoscale: a consumer that
    # starts while the lows are submitted may take one before the high job exists).
    queued = [low for low in lows if http.get(f"/v1/images/jobs/{low}").json()["status"] == "queued"]
    assert queued, "every low job started before the high one was submitted: no backlog"
    started = {job_id: wait(http, job_id)["started"] for job_id in [*busy, *lows, high]}
    # Both brokers take the queues strictly in order (Redis's worker fetches a job only when
    # a slot is free), so the high job starts before every low one still queued.
    assert started[high] <= min(started[low] for low in queued), started


def test_another_keys_job_is_not_found(http):
    if http.app_name != "jobsredis":
        pytest.skip("the tiny app runs without API keys")
    job = submit(http, seed=31).json()
    other = {"Authorization": "Bearer sk-jobs-two"}
    assert http.get(f"/v1/images/jobs/{job['id']}", headers=other).status_code == 404
    assert http.post(f"/v1/images/jobs/{job['id']}/cancel", headers=other).status_code == 404
    assert http.get(f"/v1/images/jobs/{job['id']}", headers={"Authorization": ""}).status_code == 401
    assert wait(http, job["id"])["status"] == "succeeded"


def test_job_metrics_are_exported_for_prometheus(http, metrics_port):
    if http.app_name != "images":
        pytest.skip("one app's metrics are enough: the session's tiny app")
    from tests.integration.test_observability import exported

    receiver = Receiver()
    wait(http, submit(http, seed=41, webhook=receiver.url).json()["id"])
    wanted = {
        "ray_serve_app_jobs_total": 'status="succeeded"',
        "ray_serve_app_job_queued_seconds_bucket": "le=",
        "ray_serve_app_job_running_seconds_bucket": "le=",
        "ray_serve_app_webhooks_total": 'outcome="delivered"',
        "ray_serve_app_jobs_queued": 'priority="high"',
    }
    missing, _ = exported(metrics_port, wanted)
    receiver.server.shutdown()
    assert not missing, f"not exported: {missing}"
