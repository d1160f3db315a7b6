import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ray.exceptions import RayTaskError

from deployments.errors import InvalidJobError, ServerFaultError
from serve_app.protocol.errors import InvalidRequestError, ModelNotFoundError, error_from_exception
from serve_app.fronts.error_handlers import install_error_handlers
from serve_app.fronts.shared import guarded
from serve_app.service.health import DeploymentState, StartFailureWatch, deployments_ready, start_failures
from serve_app.protocol.responses import ErrorResponse
from serve_app.fronts.openai import ImageGenerationRequest


def make_client(raise_in_route=None):
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/images/generations")
    async def generations(body: ImageGenerationRequest):
        if raise_in_route is not None:
            await guarded(_raise(raise_in_route))
        return {"ok": True}

    return TestClient(app, raise_server_exceptions=False)


async def _raise(exc):
    raise exc


def envelope(response):
    body = response.json()
    ErrorResponse.model_validate(body)  # exactly the OpenAI envelope
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    "payload,param",
    [
        ({}, "prompt"),
        ({"prompt": "a", "n": 11}, "n"),
        ({"prompt": "a", "size": "512by512"}, "size"),
        ({"prompt": "a", "seed": -5}, "seed"),
        ({"prompt": "a", "output_format": "bmp"}, "output_format"),
        ({"prompt": "a", "num_inference_steps": "many"}, "num_inference_steps"),
        ({"prompt": "a", "colour": "red"}, "colour"),
    ],
)
def test_validation_errors_are_400_naming_the_field(payload, param):
    response = make_client().post("/v1/images/generations", json=payload)
    assert response.status_code == 400
    error = envelope(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param in error["message"]


def test_missing_prompt_message():
    error = envelope(make_client().post("/v1/images/generations", json={"n": 1}))
    assert error["message"] == "Missing required parameter: 'prompt'."


@pytest.mark.parametrize("body", ['{"prompt": "a",', "not json", '["prompt"]', "42"])
def test_malformed_json_is_400(body):
    response = make_client().post(
        "/v1/images/generations", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = envelope(response)
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]


def test_unknown_route_and_method_use_the_envelope():
    client = make_client()
    assert envelope(client.get("/v1/nothing"))["type"] == "invalid_request_error"
    response = client.get("/v1/images/generations")
    assert response.status_code == 405 and envelope(response)["message"].startswith("Method GET")
    assert response.headers["allow"] == "POST"  # RFC 9110: a 405 says what the route takes


def test_internal_error_is_500_without_traceback():
    secret = "Traceback (most recent call last): secret/path.py line 1"
    response = make_client(RuntimeError(secret)).post("/v1/images/generations", json={"prompt": "a"})
    assert response.status_code == 500
    error = envelope(response)
    assert error["type"] == "server_error"
    assert "secret" not in response.text and "Traceback" not in response.text


def test_api_errors_pass_through_with_their_status():
    response = make_client(ModelNotFoundError("x", ["a", "b"])).post(
        "/v1/images/generations", json={"prompt": "a"}
    )
    assert response.status_code == 404
    assert envelope(response) == {
        "message": "The model 'x' does not exist. Available models: a, b.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_errors_raised_in_a_replica_are_unwrapped():
    wrapped = RayTaskError("refine", "remote traceback", InvalidJobError("bad latents", "image"))
    error = error_from_exception(wrapped.as_instanceof_cause())
    assert isinstance(error, InvalidRequestError)
    assert (error.status_code, error.param, error.message) == (400, "image", "bad latents")
    crash = RayTaskError("refine", "remote traceback", RuntimeError("CUDA out of memory"))
    error = error_from_exception(crash)
    assert error.status_code == 500 and "CUDA" not in error.message


def test_invalid_job_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(InvalidJobError("bad", "seed")))
    assert (error.message, error.param) == ("bad", "seed")


def test_readiness_needs_every_deployment():
    assert deployments_ready({"a": ("HEALTHY", 1), "b": ("UPSCALING", 2)})
    assert deployments_ready({"a": ("UPDATING", 1)})  # rolling update with replicas serving
    assert not deployments_ready({"a": ("HEALTHY", 1), "b": ("UPDATING", 0)})
    assert not deployments_ready({"a": ("DEPLOY_FAILED", 0)})
    assert not deployments_ready({})


def test_backpressure_is_503_with_retry_after():
    from ray.serve.exceptions import BackPressureError

    response = make_client(BackPressureError(num_queued_requests=32, max_queued_requests=32)).post(
        "/v1/images/generations", json={"prompt": "a"}
    )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    error = envelope(response)
    assert (error["type"], error["code"]) == ("server_error", "overloaded")


def test_timeout_is_504_in_the_envelope():
    from serve_app.protocol.errors import GatewayTimeoutError

    response = make_client(GatewayTimeoutError(30)).post("/v1/images/generations", json={"prompt": "a"})
    assert response.status_code == 504
    assert envelope(response)["code"] == "timeout"


def test_a_dead_replica_is_503():
    from ray.exceptions import ActorDiedError

    error = error_from_exception(ActorDiedError())
    assert error.status_code == 503 and error.headers["Retry-After"] == "5"


def test_a_server_fault_in_a_replica_is_a_500_server_error_that_names_it():
    fault = ServerFaultError("LoRA adapter 'ink' cannot be loaded into sd: The version of PEFT "
                             "you are using is not compatible (a fault of the server, not of "
                             "the request)", code="lora_unavailable")
    wrapped = RayTaskError("run", "remote traceback", fault)
    response = make_client(wrapped.as_instanceof_cause()).post(
        "/v1/images/generations", json={"prompt": "a cat"})
    assert response.status_code == 500
    error = envelope(response)
    assert (error["type"], error["code"], error["param"]) == ("server_error", "lora_unavailable", None)
    assert "The version of PEFT" in error["message"] and "remote traceback" not in error["message"]
    import pickle

    again = pickle.loads(pickle.dumps(fault))
    assert (again.message, again.code) == (fault.message, fault.code)


FAILED_START = ("The deployment failed to start 3 times in a row. This may be due to a problem "
                "with its constructor or initial health check failing. See controller logs for "
                "details. Error:\nTraceback (most recent call last):\n  File \"/x.py\", line 8, "
                "in __init__\n    open(\"/models/x2.pth\")\nFileNotFoundError: [Errno 2] No such "
                "file or directory: '/models/x2.pth'\n")


def test_start_failures_are_deployments_with_no_replica_and_a_failed_start_with_its_cause():
    statuses = {
        "esrgan-x2": DeploymentState("UNHEALTHY", 0, "REPLICA_STARTUP_FAILED", FAILED_START),
        # Still retrying, or failed once but serving with another replica: not (yet) failed.
        "sd": DeploymentState("UPSCALING", 0, "UPSCALE_COMPLETED", FAILED_START),
        "xl": DeploymentState("UNHEALTHY", 1, "REPLICA_STARTUP_FAILED", FAILED_START),
        "x4": DeploymentState("HEALTHY", 0, "CONFIG_UPDATE_COMPLETED", ""),
        "lora": DeploymentState("DEPLOY_FAILED", 0, "REPLICA_STARTUP_FAILED",
                                "Error:\n  raise X\ndeployments.loras.LoraStackError: sd: it.failed: no"),
    }
    assert start_failures(statuses) == {
        "esrgan-x2": "FileNotFoundError: [Errno 2] No such file or directory: '/models/x2.pth'",
        "lora": "LoraStackError: sd: it.failed: no"}
    assert not deployments_ready({"esrgan-x2": statuses["esrgan-x2"]})


def test_the_start_failure_watch_reads_serves_status_at_most_every_max_age():
    import asyncio

    reads = []

    def read():
        reads.append(1)
        return {"esrgan-x2": DeploymentState("DEPLOY_FAILED", 0, "REPLICA_STARTUP_FAILED", FAILED_START)}

    watch = StartFailureWatch(read, max_age_s=60)

    async def many():
        return await asyncio.gather(*(watch() for _ in range(20)))

    answers = asyncio.run(many())
    assert len(reads) == 1 and all("esrgan-x2" in answer for answer in answers)
