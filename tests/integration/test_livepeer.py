"""Livepeer's routes driven by Livepeer's own Python client (``livepeer-ai``), as the
OpenAI routes are driven by ``openai``: default arguments, every field set, and errors the
client raises as its own, with our message."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def png_bytes(width, height):
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 90)], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def from_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    return np.asarray(image.convert("RGB"))


def from_b64(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="module")
def livepeer(base_url):
    """Livepeer's client with only the server URL set (0.10.0's constructor requires a
    non-empty bearer string: any will do, this server has no API keys)."""
    from livepeer_ai import Livepeer

    return Livepeer(http_bearer="unused", server_url=base_url, timeout_ms=300_000)


def upload(width, height, name="in.png"):
    return {"file_name": name, "content": png_bytes(width, height)}


def images_of(result):
    assert result.http_meta.response.status_code == 200
    return result.image_response.images


# --- default arguments: the client sends every field with its own defaults ------------

def test_text_to_image_with_the_clients_defaults(livepeer):
    # loras "", model_id "", safety_check true, 50 steps, 1024x576, guidance 7.5.
    (media,) = images_of(livepeer.generate.text_to_image(request={"prompt": "a lighthouse"}))
    assert from_data_url(media.url).shape == (576, 1024, 3)
    assert isinstance(media.seed, int) and isinstance(media.nsfw, bool)


def test_sdxl_at_1024_with_two_images_and_the_clients_50_steps_answers_within_the_timeout(livepeer):
    # A newcomer's first call on the tiny profile: SDXL starts on demand, then 2 x 50 steps
    # at 1024x1024; past the profile's request_timeout_s (60 s) this would be a 504.
    result = livepeer.generate.text_to_image(request={
        "prompt": "a lighthouse", "model_id": "stable-diffusion-xl", "width": 1024, "height": 1024,
        "num_images_per_prompt": 2})
    images = images_of(result)
    assert len(images) == 2 and all(from_data_url(m.url).shape == (1024, 1024, 3) for m in images)
    assert images[0].seed != images[1].seed


def test_image_to_image_with_the_clients_defaults(livepeer):
    # 100 steps at strength 0.8 (80 run), image_guidance_scale 1.5, loras "".
    result = livepeer.generate.image_to_image(request={"prompt": "a fox", "image": upload(96, 64)})
    (media,) = images_of(result)
    assert from_data_url(media.url).shape == (64, 96, 3)


def test_upscale_with_the_clients_defaults(livepeer):
    # 75 steps on the default upscaler (the x2 latent upscaler).
    result = livepeer.generate.upscale(request={"prompt": "a cat", "image": upload(96, 64)})
    (media,) = images_of(result)
    assert from_data_url(media.url).shape == (128, 192, 3)


@pytest.mark.parametrize(
    "model_id,factor",
    [("stabilityai/stable-diffusion-x4-upscaler", 4), ("stabilityai/sd-x2-latent-upscaler", 2),
     ("esrgan-x2", 2)],
)
def test_a_thumbnail_upscales_on_every_upscaler(livepeer, model_id, factor):
    # 64x48 is under the old 64-pixel floor on one side; every model takes it. ESRGAN has
    # no denoising loop and ignores the client's 75 steps.
    result = livepeer.generate.upscale(
        request={"prompt": "a cat", "image": upload(64, 48), "model_id": model_id, "seed": 3}
    )
    (media,) = images_of(result)
    assert from_data_url(media.url).shape == (48 * factor, 64 * factor, 3)
    assert media.seed == 3


# --- every field set: the same meaning as the OpenAI routes' fields -------------------

def test_text_to_image_every_field_means_what_the_openai_fields_mean(livepeer, client):
    result = livepeer.generate.text_to_image(request={
        "model_id": "stabilityai/stable-diffusion-xl-base-1.0", "loras": "", "prompt": "a red barn",
        "width": 512, "height": 384, "guidance_scale": 5.0, "negative_prompt": "fog",
        "safety_check": False, "seed": 11, "num_inference_steps": 3, "num_images_per_prompt": 2,
    })
    images = images_of(result)
    assert [m.seed for m in images] == [11, 12]
    same = client.images.generate(
        model="stable-diffusion-xl", prompt="a red barn", size="512x384", n=2, moderation="low",
        extra_body={"seed": 11, "num_inference_steps": 3, "guidance_scale": 5.0,
                    "negative_prompt": "fog"},
    )
    for media, item in zip(images, same.data):
        assert np.array_equal(from_data_url(media.url), from_b64(item.b64_json))


def test_image_to_image_every_field_means_what_the_edit_fields_mean(livepeer, http):
    image = png_bytes(96, 64)
    result = livepeer.generate.image_to_image(request={
        "prompt": "a fox in snow", "image": {"file_name": "in.png", "content": image},
        "model_id": "stabilityai/stable-diffusion-2-1", "loras": "{}", "strength": 0.5,
        "guidance_scale": 6.0, "image_guidance_scale": 1.2, "negative_prompt": "blur",
        "safety_check": False, "seed": 5, "num_inference_steps": 8, "num_images_per_prompt": 2,
    })
    images = images_of(result)
    assert [m.seed for m in images] == [5, 6]
    response = http.post("/v1/images/edits", files={"image": ("in.png", image, "image/png")}, data={
        "prompt": "a fox in snow", "model": "stable-diffusion-2-1", "strength": "0.5",
        "guidance_scale": "6.0", "negative_prompt": "blur", "moderation": "low", "seed": "5",
        "num_inference_steps": "8", "n": "2"})
    assert response.status_code == 200, response.text
    for media, item in zip(images, response.json()["data"]):
        assert np.array_equal(from_data_url(media.url), from_b64(item["b64_json"]))


def test_upscale_every_field(livepeer):
    request = {"prompt": "a cat", "image": upload(64, 48),
               "model_id": "stabilityai/stable-diffusion-x4-upscaler", "safety_check": False,
               "seed": 9, "num_inference_steps": 4}
    first, again = (images_of(livepeer.generate.upscale(request=request))[0] for _ in range(2))
    # safety_check false: flagged images are marked, not blurred (moderation "low").
    assert first.seed == 9 and isinstance(first.nsfw, bool)
    assert np.array_equal(from_data_url(first.url), from_data_url(again.url))  # seeded


def test_any_size_within_the_bounds(livepeer):
    # SD 2.1 takes any multiple of 8 up to 768x768's area, not only its named sizes.
    (media,) = images_of(livepeer.generate.text_to_image(request={
        "prompt": "a kite", "width": 776, "height": 744, "num_inference_steps": 2}))
    assert from_data_url(media.url).shape == (744, 776, 3)


# --- errors: raised by the client as its own, with our message ------------------------

@pytest.mark.parametrize(
    "request_fields,needle",
    [
        ({"model_id": "nope/nope"}, "nope/nope"),
        ({"loras": '{"nerijs/pixel-art-xl": 1.2}'}, "loras"),
        ({"loras": "not json"}, "loras"),
        ({"num_inference_steps": 101}, "num_inference_steps"),
        ({"width": 1024, "height": 1024}, "width"),
        ({"width": 1004, "height": 576}, "width"),  # not a multiple of 8
    ],
)
def test_a_bad_text_to_image_request_raises_the_clients_http_error(livepeer, request_fields, needle):
    from livepeer_ai.models import errors

    with pytest.raises(errors.HTTPError) as info:
        livepeer.generate.text_to_image(request={"prompt": "a cat", **request_fields})
    assert needle in info.value.data.detail.msg
    assert info.value.data.detail.msg.startswith(needle) or needle == "nope/nope"


def test_image_to_image_steps_count_what_runs(livepeer):
    from livepeer_ai.models import errors

    # 200 steps at strength 0.5 run 100: within the limit of 100.
    result = livepeer.generate.image_to_image(request={
        "prompt": "a fox", "image": upload(64, 64), "num_inference_steps": 200, "strength": 0.5})
    assert len(images_of(result)) == 1
    with pytest.raises(errors.HTTPError) as info:
        livepeer.generate.image_to_image(request={
            "prompt": "a fox", "image": upload(64, 64), "num_inference_steps": 200, "strength": 0.6})
    assert "120 denoising steps" in info.value.data.detail.msg


def test_a_malformed_field_is_a_422_validation_error(livepeer):
    from livepeer_ai.models import errors

    with pytest.raises(errors.HTTPValidationError) as info:
        livepeer.generate.text_to_image(request={"prompt": "a cat", "num_images_per_prompt": 0})
    (detail,) = info.value.data.detail
    assert detail.loc == ["body", "num_images_per_prompt"]


def test_a_bad_upload_names_the_image(livepeer):
    from livepeer_ai.models import errors

    with pytest.raises(errors.HTTPError) as info:
        livepeer.generate.upscale(request={
            "prompt": "a cat", "image": {"file_name": "x.png", "content": b"not an image"}})
    assert info.value.data.detail.msg.startswith("image")


def test_the_openai_routes_keep_the_openai_envelope(http):
    response = http.post("/v1/images/generations", json={"prompt": "a cat", "model": "nope/nope"})
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model"
    response = http.post("/text-to-image", json={"prompt": "a cat", "model_id": "nope/nope"})
    assert response.status_code == 400 and set(response.json()) == {"detail"}
