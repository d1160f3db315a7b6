"""Stability's gRPC API with plain grpcio and the project's generated stubs: API keys in the
``authorization`` metadata, Serve's health and reflection services on the same port, the
request id, an answer over gRPC's default message size, and the request limits."""

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from serve_app.fronts.gooseai import generation_pb2 as generation
from serve_app.fronts.gooseai import generation_pb2_grpc
from tests.conftest import REPO_ROOT
from tests.integration.conftest import side_app

pytestmark = pytest.mark.integration

SECURE_CONFIG = REPO_ROOT / "tests" / "integration" / "secure.yaml"
BIG = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def channel(grpc_target):
    with grpc.insecure_channel(grpc_target, options=[("grpc.max_receive_message_length", BIG),
                                                    ("grpc.max_send_message_length", BIG)]) as chan:
        yield chan


@pytest.fixture(scope="module")
def stub(channel):
    return generation_pb2_grpc.GenerationServiceStub(channel)


def png(width, height, noise=False) -> bytes:
    pixels = (np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8) if noise
              else np.full((height, width, 3), 90, np.uint8))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def upscale(data: bytes, engine="esrgan-v1-x2plus", request_id="plain-1"):
    prompt = generation.Prompt(artifact=generation.Artifact(type=generation.ARTIFACT_IMAGE, binary=data))
    return generation.Request(engine_id=engine, request_id=request_id, prompt=[prompt],
                              image=generation.ImageParameters())


def test_an_answer_larger_than_grpcs_default_message_size(stub):
    """ESRGAN from 1024x1024 (the document's input limit) to 2048x2048: a PNG over gRPC's
    default 4 MiB message (about 4.3 MB from the tiny model); the proxy sends it whole."""
    (answer,) = list(stub.Generate(upscale(png(1024, 1024, noise=True), request_id="big"), timeout=120))
    (artifact,) = answer.artifacts
    assert artifact.size == len(artifact.binary) > 4 * 1024 * 1024
    assert Image.open(io.BytesIO(artifact.binary)).size == (2048, 2048)
    assert answer.request_id == "big" and answer.meta.engine_id == "esrgan-v1-x2plus"


def test_serves_health_and_reflection_on_the_same_port(channel):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    health = serve_pb2_grpc.RayServeAPIServiceStub(channel)
    assert health.Healthz(serve_pb2.HealthzRequest(), timeout=10).message == "success"
    assert "images" in health.ListApplications(serve_pb2.ListApplicationsRequest(),
                                               timeout=10).application_names
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    (listed,) = list(reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    assert "gooseai.GenerationService" in {s.name for s in listed.list_services_response.service}


def test_a_method_stabilitys_service_has_but_we_do_not_serve_is_unimplemented(channel):
    chain = channel.unary_stream("/gooseai.GenerationService/ChainGenerate")
    with pytest.raises(grpc.RpcError) as info:
        list(chain(b"", timeout=10))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.fixture(scope="module")
def secure(base_url):
    """tests/integration/secure.yaml beside the tiny app: API keys on, 200 kB uploads."""
    from tests.integration.test_security import SECURE_ENV

    with side_app(SECURE_CONFIG, base_url, env=SECURE_ENV):
        yield [("application", "secure")]


@pytest.mark.parametrize("metadata", [[], [("authorization", "Bearer sk-wrong")],
                                      [("authorization", "sk-test-one")]])
def test_without_a_valid_key_the_call_is_unauthenticated(stub, secure, metadata):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(upscale(png(32, 32), engine="no-such-engine"), metadata=secure + metadata,
                           timeout=30))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info.value.details().startswith("authorization metadata:")


def test_with_a_key_in_the_authorization_metadata_the_call_is_answered(stub, secure):
    metadata = secure + [("authorization", "Bearer sk-test-two")]
    (answer,) = list(stub.Generate(upscale(png(32, 24), engine="esrgan-x2"), metadata=metadata, timeout=60))
    assert Image.open(io.BytesIO(answer.artifacts[0].binary)).size == (64, 48)


def test_the_apps_upload_limit_holds_for_init_images(stub, secure):
    metadata = secure + [("authorization", "Bearer sk-test-one")]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(upscale(png(400, 400, noise=True), engine="esrgan-x2"), metadata=metadata,
                           timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("prompt[0].artifact.binary:")
    assert "200000 bytes" in info.value.details()


def test_with_two_apps_a_client_must_name_its_app(stub, secure):
    """Serve's rule: with more than one application, the ``application`` metadata picks one."""
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(upscale(png(32, 32)), timeout=30))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "application" in info.value.details().lower()
