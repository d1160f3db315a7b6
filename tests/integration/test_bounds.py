"""Bounded before it costs, on the running tiny app: every front refuses a step count the
model cannot take (whatever the strength) with its own error shape, uploads are checked
against the model before decoding, phone photos are read, and today's openai client gets
OpenAI's answers for several images and streamed edits."""

import io
import json

import grpc
import numpy as np
import openai
import pytest
from PIL import Image

from serve_app.fronts.gooseai import generation_pb2 as generation
from serve_app.fronts.gooseai import generation_pb2_grpc

pytestmark = pytest.mark.integration


def png(width=64, height=64, color=(120, 80, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def error_of(response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


@pytest.mark.parametrize("fields,param,needle", [
    # Ten steps run, but the scheduler would set up five million (or a thousand) timesteps.
    ({"num_inference_steps": "5000000", "strength": "0.000002"}, "num_inference_steps", "1000"),
    ({"num_inference_steps": "1000", "strength": "0.01"}, "num_inference_steps", "schedule"),
    ({"num_inference_steps": "4", "strength": "0.1"}, "strength", "no denoising step"),
])
def test_an_edits_schedule_is_bounded_whatever_the_strength(http, fields, param, needle):
    response = http.post("/v1/images/edits", data={"prompt": "a fox", "model": "stable-diffusion-xl", **fields},
                         files={"image": ("in.png", png(), "image/png")})
    error = error_of(response)
    assert error["param"] == param and needle in error["message"], error


def test_livepeers_image_to_image_refuses_a_schedule_the_scheduler_would_refuse(http):
    """SD 2.1's DDIM scheduler refuses more than 1000 steps: a 400 in Livepeer's shape at
    planning (the wire takes at most 1000), never the scheduler's 500."""
    files = {"image": ("in.png", png(), "image/png")}
    response = http.post("/image-to-image", data={"prompt": "a fox", "num_inference_steps": "1000",
                                                  "strength": "0.001"}, files=files)
    assert response.status_code == 400, response.text
    assert response.json()["detail"]["msg"].startswith("num_inference_steps:")
    response = http.post("/image-to-image", data={"prompt": "a fox", "num_inference_steps": "2000",
                                                  "strength": "0.001"}, files=files)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "num_inference_steps"]


def test_a_job_is_bounded_as_its_route_is(http):
    response = http.post("/v1/images/jobs", json={"operation": "generations",
                                                  "input": {"prompt": "a", "num_inference_steps": 1001}})
    assert error_of(response)["param"] == "input.num_inference_steps"
    response = http.post("/v1/images/jobs", data={"operation": "edits", "prompt": "a"},
                         files=[("image", ("a.png", png(), "image/png")),
                                ("image", ("b.png", png(), "image/png"))])
    assert error_of(response)["param"] == "image"


@pytest.fixture(scope="module")
def stub(grpc_target):
    big = 64 * 1024 * 1024
    with grpc.insecure_channel(grpc_target, options=[("grpc.max_receive_message_length", big),
                                                    ("grpc.max_send_message_length", big)]) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def _grpc_error(stub, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, timeout=60))
    return info.value


def test_grpc_refuses_steps_past_the_wire_and_a_schedule_past_the_model(stub):
    text = generation.Prompt(text="a lighthouse")
    error = _grpc_error(stub, generation.Request(
        engine_id="stable-diffusion-512-v2-1", prompt=[text],
        image=generation.ImageParameters(width=512, height=512, steps=5000)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("image.steps:")
    init = generation.Prompt(artifact=generation.Artifact(type=generation.ARTIFACT_IMAGE, binary=png()))
    schedule = generation.StepParameter(schedule=generation.ScheduleParameters(start=0.01))
    error = _grpc_error(stub, generation.Request(
        engine_id="stable-diffusion-512-v2-1", prompt=[text, init],
        image=generation.ImageParameters(steps=1000, parameters=[schedule])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("image.steps:")


def test_the_grpc_proxy_refuses_a_message_past_the_profiles_limit(stub):
    """The profile sets Serve's proxy limit (32 MiB) through the controller: a larger message
    is refused by the proxy, before the ingress holds any of it."""
    error = _grpc_error(stub, generation.Request(engine_id="esrgan-v1-x2plus",
                                                 prompt=[generation.Prompt(text="a" * (40 << 20))]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_upload_over_an_upscalers_limit_is_refused_from_its_header(http):
    # ESRGAN takes at most 1048576 input pixels: a 2048x2048 image (one colour, a few KB)
    # is refused before any of its 4 million pixels is decoded.
    response = http.post("/v1/images/upscale", data={"model": "esrgan-x2"},
                         files={"image": ("big.png", png(2048, 2048), "image/png")})
    error = error_of(response)
    assert error["param"] == "image" and "1048576" in error["message"]


def test_a_phone_photo_is_edited(http):
    """Phones save multi-picture JPEGs (MPO); the photo is the first picture."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 120, 200)).save(
        buffer, "MPO", save_all=True, append_images=[Image.new("RGB", (64, 64))])
    response = http.post("/v1/images/edits", data={"prompt": "a fox", "num_inference_steps": "2"},
                         files={"image": ("photo.jpg", buffer.getvalue(), "image/jpeg")})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1


def test_the_openai_client_gets_a_400_naming_image_for_several_images(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=[("a.png", png()), ("b.png", png())], prompt="a fox")
    error = info.value.body
    assert error["param"] == "image" and "takes one image, got 2" in error["message"], error


def test_the_openai_client_edits_a_list_of_one_image(client):
    one = client.images.edit(image=[("a.png", png())], prompt="a fox", extra_body={"seed": 5, "num_inference_steps": 2})
    plain = client.images.edit(image=("a.png", png()), prompt="a fox", extra_body={"seed": 5, "num_inference_steps": 2})
    assert one.data[0].b64_json == plain.data[0].b64_json


def test_the_openai_client_streams_an_edit_as_openai_names_its_events(client):
    stream = client.images.edit(image=("a.png", png()), prompt="a fox", stream=True, partial_images=1,
                                extra_body={"seed": 2, "num_inference_steps": 3, "strength": 1.0})
    events = list(stream)
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert type(events[-1]).__name__ == "ImageEditCompletedEvent" and events[-1].b64_json


def test_a_prompt_past_the_wire_bound_is_a_400_on_every_http_front(http):
    long = "a" * 10_001
    assert error_of(http.post("/v1/images/generations", json={"prompt": long}))["param"] == "prompt"
    response = http.post("/text-to-image", json={"prompt": long})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "prompt"]
