"""POST /v1/images/generations through the real openai client and raw HTTP."""

import base64
import io
import statistics
import time

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode(b64).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize(
    "model,size,n",
    [
        ("stable-diffusion-2-1", "512x512", 2),
        ("stable-diffusion-xl", "768x768", 2),
        ("stable-diffusion-xl-with-refiner", "1024x1024", 1),
        ("stable-diffusion-xl-with-refiner", "512x512", 3),
    ],
)
def test_openai_client_generates_n_images_of_the_size(client, model, size, n):
    response = client.images.generate(
        model=model, prompt="a lighthouse at dusk", n=n, size=size, response_format="b64_json",
        extra_body={"seed": 1234},
    )
    assert isinstance(response.created, int) and abs(response.created - time.time()) < 300
    assert len(response.data) == n
    width, height = map(int, size.split("x"))
    for i, item in enumerate(response.data):
        image = decode(item.b64_json)
        assert (image.format, image.size, image.mode) == ("PNG", (width, height), "RGB")
        assert item.model_extra["seed"] == 1234 + i


def test_default_model_and_size(client):
    response = client.images.generate(prompt="a cat")
    (item,) = response.data
    assert decode(item.b64_json).size == (512, 512)
    assert isinstance(item.model_extra["seed"], int) and item.model_extra["seed"] >= 0


@pytest.mark.parametrize("fmt,pil_name", [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_output_formats(client, fmt, pil_name):
    extra = {"output_compression": 80} if fmt != "png" else {}
    response = client.images.generate(
        prompt="a cat", size="256x256", output_format=fmt, extra_body={"seed": 3}, **extra
    )
    assert decode(response.data[0].b64_json).format == pil_name
    assert response.output_format == fmt and response.size == "256x256"


def test_jpeg_compression_changes_the_bytes(client):
    sizes = []
    for quality in (10, 95):
        response = client.images.generate(
            prompt="a cat", size="512x512", output_format="jpeg", output_compression=quality,
            extra_body={"seed": 3},
        )
        sizes.append(len(base64.b64decode(response.data[0].b64_json)))
    assert sizes[0] < sizes[1]


@pytest.mark.parametrize("model", ["stable-diffusion-2-1", "stable-diffusion-xl-with-refiner"])
def test_same_seed_same_pixels(client, model):
    def generate(seed, n):
        return client.images.generate(
            model=model, prompt="a red fox", n=n, size="256x256", extra_body={"seed": seed}
        ).data

    first, second = generate(50, 2), generate(50, 2)
    assert np.array_equal(pixels(first[0].b64_json), pixels(second[0].b64_json))
    assert np.array_equal(pixels(first[1].b64_json), pixels(second[1].b64_json))
    assert not np.array_equal(pixels(first[0].b64_json), pixels(first[1].b64_json))
    # Image 1 of seed 50 is the image of seed 51.
    (alone,) = generate(51, 1)
    assert np.abs(pixels(first[1].b64_json) - pixels(alone.b64_json)).max() <= 2


def test_drawn_seeds_are_returned_and_reproduce(client):
    drawn = client.images.generate(prompt="a boat", n=2, size="256x256").data
    seeds = [item.model_extra["seed"] for item in drawn]
    assert seeds[1] == seeds[0] + 1
    again = client.images.generate(prompt="a boat", n=2, size="256x256", extra_body={"seed": seeds[0]})
    for first, second in zip(drawn, again.data):
        assert np.array_equal(pixels(first.b64_json), pixels(second.b64_json))


def test_extension_fields_change_the_image(client):
    def generate(**extra):
        response = client.images.generate(
            prompt="a red fox", size="256x256", extra_body={"seed": 9, **extra}
        )
        return pixels(response.data[0].b64_json)

    base = generate()
    assert not np.array_equal(base, generate(negative_prompt="blurry"))
    assert not np.array_equal(base, generate(guidance_scale=1.5))
    assert not np.array_equal(base, generate(num_inference_steps=3))


def test_refiner_chain_fraction_is_honoured(client):
    def generate(frac):
        response = client.images.generate(
            model="stable-diffusion-xl-with-refiner", prompt="a red fox", size="256x256",
            extra_body={"seed": 9, "high_noise_frac": frac, "num_inference_steps": 6},
        )
        return pixels(response.data[0].b64_json)

    assert not np.array_equal(generate(0.5), generate(0.8))


def test_hub_ids_are_aliases(client):
    for alias in ("stabilityai/stable-diffusion-2-1", "stabilityai/stable-diffusion-xl-base-1.0"):
        response = client.images.generate(model=alias, prompt="a cat", size="512x512")
        assert decode(response.data[0].b64_json).size == (512, 512)


def test_models_list(client, http):
    listed = client.models.list()
    ids = [model.id for model in listed.data]
    assert ids == [
        "stable-diffusion-2-1",
        "stable-diffusion-xl",
        "stable-diffusion-xl-refiner",
        "stable-diffusion-x2-latent-upscaler",
        "stable-diffusion-x4-upscaler",
        "esrgan-x2",
        "stable-diffusion-xl-with-refiner",
    ]
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list"
    takes_loras = {"stable-diffusion-2-1", "stable-diffusion-xl", "stable-diffusion-xl-with-refiner"}
    for card in raw["data"]:
        lora_fields = {"loras", "allow_hub_loras", "max_loras_per_request"} if card["id"] in takes_loras else set()
        assert set(card) == {"id", "object", "created", "owned_by", "capabilities"} | lora_fields
        assert card["object"] == "model"
    capabilities = {card["id"]: set(card["capabilities"]) for card in raw["data"]}
    assert capabilities["stable-diffusion-2-1"] == {"text-to-image", "image-to-image", "inpaint"}
    assert capabilities["esrgan-x2"] == {"upscale"}
    assert capabilities["stable-diffusion-xl-with-refiner"] == {"text-to-image"}
    assert client.models.retrieve("stabilityai/stable-diffusion-2-1").id == "stable-diffusion-2-1"


def test_health_reports_every_deployment(http):
    response = http.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["deployments"]) == {
        "ImagesIngress",
        "ImageStore",
        "SafetyChecker",
        "JobsConsumer",  # the jobs API's task consumer
        "stable-diffusion-2-1",
        "stable-diffusion-xl",
        "stable-diffusion-xl-refiner",
        "stable-diffusion-x2-latent-upscaler",
        "stable-diffusion-x4-upscaler",
        "esrgan-x2",
    }


def test_raw_http_request_like_curl(http):
    response = http.post(
        "/v1/images/generations",
        json={"prompt": "a cat", "model": "stable-diffusion-xl", "n": 2, "size": "512x512", "seed": 5},
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) >= {"created", "data"}
    assert [item["seed"] for item in body["data"]] == [5, 6]
    # The tiny profile runs the safety checker: every image says whether it was flagged.
    assert all(set(item) == {"b64_json", "seed", "nsfw"} for item in body["data"])
    assert set(body["usage"]) == {"denoising_steps", "output_pixels", "model_seconds"}


def test_latency_budget_on_the_tiny_profile(http):
    """The tiny profile's latency budget: 512x512 SD 2.1 under 2 s, 1024x1024 SDXL with refiner under 5 s."""

    def median_latency(payload):
        http.post("/v1/images/generations", json=payload).raise_for_status()  # warm
        times = []
        for _ in range(3):
            start = time.perf_counter()
            http.post("/v1/images/generations", json=payload).raise_for_status()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    sd = median_latency({"prompt": "a cat", "model": "stable-diffusion-2-1", "size": "512x512"})
    xl = median_latency(
        {"prompt": "a cat", "model": "stable-diffusion-xl-with-refiner", "size": "1024x1024"}
    )
    print(f"tiny latency: sd21 512x512 {sd:.3f}s, sdxl+refiner 1024x1024 {xl:.3f}s")
    assert sd < 2.0 and xl < 5.0


@pytest.mark.parametrize(
    "model,n,steps",
    [("stable-diffusion-2-1", 2, 4 * 2), ("stable-diffusion-xl-with-refiner", 2, (4 + 1) * 2)],
)
def test_usage_counts_steps_pixels_and_model_time(http, model, n, steps):
    body = http.post("/v1/images/generations",
                     json={"prompt": "a cat", "model": model, "n": n, "size": "256x256"}).json()
    usage = body["usage"]
    assert usage["denoising_steps"] == steps
    assert usage["output_pixels"] == n * 256 * 256
    assert 0 < usage["model_seconds"] < 30


def test_usage_of_an_upscale_chain_adds_the_upscaler(http):
    body = http.post("/v1/images/generations", json={
        "prompt": "a cat", "size": "256x256", "upscale": "stable-diffusion-x2-latent-upscaler"}).json()
    # SD 2.1's 4 steps, then the tiny x2 latent upscaler's 3.
    assert body["usage"]["denoising_steps"] == 4 + 3
    assert body["usage"]["output_pixels"] == 512 * 512
