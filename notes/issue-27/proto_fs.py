"""Prototype on Redis: priorities (priority_steps, queue_order_strategy) with Ray's Celery
adapter, and redelivery of a job whose consumer replica is killed mid-run."""
import os, time, pathlib, sys, subprocess, signal
import ray
from ray import serve
from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig
from ray.serve.task_consumer import task_consumer, task_handler, instantiate_adapter_from_config

URL = None
cfg = TaskProcessorConfig(queue_name="images-jobs", adapter_config=CeleryAdapterConfig(
    broker_url="filesystem://", backend_url="file:///tmp/jobsproto/fsdata/results",
    broker_transport_options={"data_folder_in": "/tmp/jobsproto/fsdata/in", "data_folder_out": "/tmp/jobsproto/fsdata/in", "processed_folder": "/tmp/jobsproto/fsdata/p"},
    app_custom_config={"broker_connection_retry_on_startup": True, "worker_prefetch_multiplier": 1,
                       "task_default_priority": 3}),
    max_retries=2)

LOG = "/tmp/jobsproto/order.log"

@serve.deployment(max_ongoing_requests=4)
@task_consumer(task_processor_config=cfg)
class Consumer:
    @task_handler(name="run_job")
    def run_job(self, job_id, seconds):
        with open(LOG, "a") as f:
            f.write(f"start {job_id} {os.getpid()} {time.time():.1f}\n")
        time.sleep(seconds)
        with open(LOG, "a") as f:
            f.write(f"end {job_id} {os.getpid()} {time.time():.1f}\n")
        return job_id

if os.path.exists(LOG): os.remove(LOG)
import shutil; shutil.rmtree("/tmp/jobsproto/fsdata", ignore_errors=True)
for d in ("in", "p", "results"): os.makedirs(f"/tmp/jobsproto/fsdata/{d}")
ray.init(address="local", num_cpus=4, include_dashboard=False)
serve.start(http_options={"port": 8322})
mode = sys.argv[1]
adapter = instantiate_adapter_from_config(cfg)
if mode == "priority":
    # a backlog of low jobs (priority 9 = lowest in kombu redis: 0 is highest), then a high one
    ids = [adapter.enqueue_task_sync("run_job", args=[f"low{i}", 0.3], priority=9).id for i in range(6)]
    hi = adapter.enqueue_task_sync("run_job", args=["high", 0.3], priority=0).id
    serve.run(Consumer.options(ray_actor_options={"num_cpus": 0.1}).bind(), name="jobs", route_prefix=None)
    time.sleep(12)
    print(open(LOG).read())
else:
    serve.run(Consumer.options(ray_actor_options={"num_cpus": 0.1}).bind(), name="jobs", route_prefix=None)
    r = adapter.enqueue_task_sync("run_job", args=["victim", 4])
    time.sleep(2)
    lines = open(LOG).read().split()
    pid = int(lines[2]); print("killing", pid); os.kill(pid, signal.SIGKILL)
    t = time.time()
    while time.time() - t < 40:
        s = adapter.get_task_status_sync(r.id)
        if s.status == "SUCCESS": break
        time.sleep(1)
    print("status", s.status, round(time.time() - t, 1)); print(open(LOG).read())
serve.shutdown(); ray.shutdown()
