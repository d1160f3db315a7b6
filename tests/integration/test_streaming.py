"""stream: true answers with OpenAI's Server-Sent Events: previews, then the image."""

import base64
import io
import json

import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def decode(b64):
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_openai_client_streams_partial_images(client):
    stream = client.images.generate(
        prompt="a lighthouse", model="stable-diffusion-2-1", size="256x256", stream=True,
        partial_images=2, extra_body={"seed": 3, "num_inference_steps": 6},
    )
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events:
        assert decode(event.b64_json).size == (256, 256)
    final = events[-1]
    assert final.to_dict()["usage"]["denoising_steps"] == 6


def test_streamed_image_equals_the_plain_one(http):
    payload = {"prompt": "a fox", "size": "256x256", "seed": 11, "model": "stable-diffusion-xl"}
    plain = http.post("/v1/images/generations", json=payload).json()["data"][0]["b64_json"]
    with http.stream("POST", "/v1/images/generations", json={**payload, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = "".join(response.iter_text())
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["image_generation.completed"]
    assert events[0]["b64_json"] == plain


def test_streaming_an_edit(http):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(buffer, format="PNG")
    with http.stream("POST", "/v1/images/edits",
                     data={"prompt": "a fox", "stream": "true", "partial_images": "1", "strength": "1.0",
                           "num_inference_steps": "4"},
                     files={"image": ("in.png", buffer.getvalue(), "image/png")}) as response:
        body = "".join(response.iter_text())
    types = [json.loads(line[6:])["type"] for line in body.splitlines() if line.startswith("data: ")]
    # OpenAI names an edit's events after the edit.
    assert types == ["image_edit.partial_image", "image_edit.completed"]


@pytest.mark.parametrize(
    "payload,param",
    [
        ({"partial_images": 2}, "partial_images"),
        ({"stream": True, "partial_images": 4}, "partial_images"),
        ({"stream": True, "n": 2}, "n"),
        ({"stream": True, "model": "stable-diffusion-xl-with-refiner"}, "stream"),
        ({"stream": True, "upscale": "esrgan-x2"}, "stream"),
    ],
)
def test_stream_errors_are_plain_json_400s(http, payload, param):
    response = http.post("/v1/images/generations", json={"prompt": "a cat", **payload})
    assert response.status_code == 400 and response.json()["error"]["param"] == param
