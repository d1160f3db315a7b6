"""Prototype: Ray Serve task_consumer on Celery's filesystem transport + file backend, a sync
handler calling another deployment's handle; enqueue from the driver; poll; cancel flag."""
import os, time, json, pathlib, sys
import ray
from ray import serve
from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig
from ray.serve.task_consumer import task_consumer, task_handler, instantiate_adapter_from_config

root = pathlib.Path("/tmp/jobsproto/data"); 
for d in ("broker/in", "broker/processed", "results"):
    (root / d).mkdir(parents=True, exist_ok=True)
opts = {"data_folder_in": str(root / "broker/in"), "data_folder_out": str(root / "broker/in"),
        "processed_folder": str(root / "broker/processed"), "store_processed": False}
cfg = TaskProcessorConfig(queue_name="images-jobs", adapter_config=CeleryAdapterConfig(
    broker_url="filesystem://", backend_url=f"file://{root / 'results'}", broker_transport_options=opts,
    app_custom_config={"broker_connection_retry_on_startup": True}),
    max_retries=2, failed_task_queue_name="images-jobs-failed")

@serve.deployment
class Model:
    async def run(self, x):
        import asyncio
        await asyncio.sleep(1)
        return x * 2

@serve.deployment(max_ongoing_requests=4)
@task_consumer(task_processor_config=cfg)
class Consumer:
    def __init__(self, model):
        self.model = model
    @task_handler(name="run_job")
    def run_job(self, job_id, x):
        print("handler got", job_id, x, flush=True)
        return {"job": job_id, "y": self.model.run.remote(x).result()}

ray.init(address="local", num_cpus=4, include_dashboard=False)
serve.start(http_options={"port": 8321})
serve.run(Consumer.bind(Model.bind()), name="jobs", route_prefix=None)
adapter = instantiate_adapter_from_config(cfg)
t = time.time()
r = adapter.enqueue_task_sync("run_job", args=["j1", 21])
print("enqueued", r.id, r.status)
for _ in range(60):
    s = adapter.get_task_status_sync(r.id)
    if s.status in ("SUCCESS", "FAILURE"):
        break
    time.sleep(0.5)
print("status", s.status, s.result, round(time.time() - t, 1))
backend = adapter._app.backend
print(type(backend).__name__)
backend.set("serve-app-job-x", json.dumps({"a": 1}))
print(backend.get("serve-app-job-x"))
serve.shutdown(); ray.shutdown()
