"""LoRA adapters per request on the tiny profile's seeded tiny LoRAs (SD 2.1: ink, pastel,
grain, at most 2 loaded per replica; SDXL: ink), through the real clients."""

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.integration.test_observability import metric_lines, scrape

pytestmark = pytest.mark.integration

SIZE = "256x256"


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def generate(http, loras=None, seed=21, n=1, **fields):
    body = {"prompt": "a lighthouse on a cliff", "size": SIZE, "seed": seed, "n": n,
            "num_inference_steps": 3, "moderation": "low", **fields}
    if loras is not None:
        body["loras"] = loras
    response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    return [pixels(item["b64_json"]) for item in response.json()["data"]]


def png(width=96, height=64):
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 90)], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def plain(http):
    return generate(http)[0]


def test_an_adapter_changes_the_image_and_weight_zero_does_not(http, plain):
    inked = generate(http, {"ink": 1.0})[0]
    assert np.abs(inked - plain).mean() > 1.0
    assert np.array_equal(generate(http, {"ink": 0.0})[0], plain)
    assert np.array_equal(generate(http)[0], plain)  # after adapters ran: the model as loaded


def test_the_openai_client_sends_loras(client, plain):
    result = client.images.generate(
        prompt="a lighthouse on a cliff", size=SIZE, moderation="low",
        extra_body={"seed": 21, "num_inference_steps": 3, "loras": [{"name": "ink", "weight": 1.0}]})
    assert not np.array_equal(pixels(result.data[0].b64_json), plain)


def test_same_adapter_and_seed_same_pixels_alone_and_batched(http):
    alone = generate(http, {"pastel": 0.7}, seed=40)[0]
    # Four concurrent requests of one adapter set batch together (max_batch_images 8).
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: generate(http, {"pastel": 0.7}, seed=s)[0], [40, 41, 42, 43]))
    assert np.abs(results[0] - alone).max() <= 2  # batch arithmetic, as without adapters
    assert np.abs(generate(http, {"pastel": 0.7}, seed=40, n=2)[0] - alone).max() <= 2


def test_concurrent_requests_with_different_adapters_get_what_they_would_alone(http):
    sets = [None, {"ink": 1.0}, {"pastel": 1.0}, {"ink": 0.5, "pastel": 0.5}]
    alone = [generate(http, loras, seed=7)[0] for loras in sets]
    with ThreadPoolExecutor(len(sets)) as pool:
        together = list(pool.map(lambda loras: generate(http, loras, seed=7)[0], sets))
    for one, other in zip(alone, together):
        assert np.abs(one - other).max() <= 2
    assert not np.array_equal(alone[1], alone[2])


def _pipeline_calls(port: int, model: str = "stable-diffusion-2-1") -> float:
    """Pipeline calls on ``model``'s replicas (the batch_images histogram's count), once the
    exported figure has stopped moving for 3 s."""
    seen, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        lines = metric_lines(scrape(port), "ray_serve_app_batch_images_count")
        seen.append(sum(float(line.split()[-1]) for line in lines if f'model="{model}"' in line))
        if len(seen) >= 4 and len(set(seen[-4:])) == 1:
            break
        time.sleep(1)
    return seen[-1]


def test_concurrent_requests_of_mixed_adapters_share_calls_and_each_equals_it_alone(http, metrics_port):
    # Two adapters (the SD 2.1 replica's two slots) at weights 1, 0.5 and 0, together, and
    # requests without one: adapter sets do not split batches.
    sets = [None, {"ink": 1.0}, {"pastel": 0.5}, {"ink": 1.0, "pastel": 0.5}, {"ink": 0.0}, None]
    seeds = [11, 11, 11, 11, 11, 12]
    alone = [generate(http, loras, seed=seed)[0] for loras, seed in zip(sets, seeds)]
    assert np.array_equal(alone[4], alone[0])  # weight 0: the plain model
    assert all(np.abs(alone[0] - image).mean() > 1.0 for image in alone[1:4])  # the adapters ran
    before = _pipeline_calls(metrics_port)
    with ThreadPoolExecutor(len(sets)) as pool:
        together = list(pool.map(lambda args: generate(http, args[0], seed=args[1])[0], zip(sets, seeds)))
    for loras, one, other in zip(sets, alone, together):
        assert np.abs(one - other).max() <= 2, loras
    after = _pipeline_calls(metrics_port)
    # Fewer pipeline calls than requests: requests of different adapters shared calls.
    assert 0 < after - before < len(sets), (before, after)


def test_eviction_and_reload_give_the_same_pixels(http, metrics_port):
    # At most 2 adapters stay loaded on the SD 2.1 replica: a third evicts the least recent.
    first = generate(http, {"grain": 1.0}, seed=3)[0]
    generate(http, {"ink": 1.0}, seed=3)
    generate(http, {"pastel": 1.0}, seed=3)  # grain leaves
    assert np.array_equal(generate(http, {"grain": 1.0}, seed=3)[0], first)  # loaded again
    deadline, found = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        text = scrape(metrics_port)
        found = {name: [line for line in metric_lines(text, name) if 'adapter="grain"' in line]
                 for name in ("ray_serve_app_lora_loads_total", "ray_serve_app_lora_evictions_total")}
        if all(found.values()) and float(found["ray_serve_app_lora_loads_total"][0].split()[-1]) >= 2:
            break
        time.sleep(1)
    assert all(found.values()), found
    assert float(found["ray_serve_app_lora_loads_total"][0].split()[-1]) >= 2


def test_sdxl_and_its_chain_take_their_adapters(http):
    base = {"model": "stable-diffusion-xl", "size": "256x256"}
    assert not np.array_equal(generate(http, {"ink": 1.0}, **base)[0], generate(http, **base)[0])
    chain = {"model": "stable-diffusion-xl-with-refiner", "size": "256x256", "num_inference_steps": 5}
    assert not np.array_equal(generate(http, {"ink": 1.0}, **chain)[0], generate(http, **chain)[0])


def test_edits_and_variations_take_adapters(http):
    def edit(route, loras, **extra):
        data = {"strength": "0.8", "seed": "5", "num_inference_steps": "4", "moderation": "low", **extra}
        if loras:
            data["loras"] = json.dumps(loras)
        response = http.post(route, data=data, files={"image": ("in.png", png(), "image/png")})
        assert response.status_code == 200, response.text
        return pixels(response.json()["data"][0]["b64_json"])

    for route, extra in (("/v1/images/edits", {"prompt": "a fox"}), ("/v1/images/variations", {})):
        assert not np.array_equal(edit(route, {"ink": 1.0}, **extra), edit(route, None, **extra))


def test_the_streamed_and_the_plain_image_agree(http):
    body = {"prompt": "a lighthouse on a cliff", "size": SIZE, "seed": 9, "num_inference_steps": 3,
            "moderation": "low", "loras": {"ink": 0.9}, "stream": True, "partial_images": 1}
    with http.stream("POST", "/v1/images/generations", json=body) as response:
        text = "".join(response.iter_text())
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "image_generation.completed"
    assert np.array_equal(pixels(events[-1]["b64_json"]), generate(http, {"ink": 0.9}, seed=9)[0])


@pytest.mark.parametrize(
    "loras",
    [{"nope": 1.0}, {"ink": 1.0, "pastel": 1.0, "grain": 1.0}, {"ink": 2.5}, {"ink": "strong"},
     [{"name": "ink", "scale": 1}], "ink", {"org/some-lora": 1.0}],
)
def test_every_bad_loras_is_a_400_naming_loras(http, loras):
    response = http.post("/v1/images/generations", json={"prompt": "a cat", "size": SIZE, "loras": loras})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "loras"


def test_a_bad_loras_form_field_is_a_400(http):
    response = http.post("/v1/images/edits", data={"prompt": "a fox", "loras": "{ink"},
                         files={"image": ("in.png", png(), "image/png")})
    assert response.status_code == 400 and response.json()["error"]["param"] == "loras"
    response = http.post("/v1/images/edits", data={"prompt": "a fox", "loras": '{"pastel": 1}',
                                                    "model": "stable-diffusion-xl"},
                         files={"image": ("in.png", png(), "image/png")})
    assert response.status_code == 400 and "ink" in response.json()["error"]["message"]


def test_the_model_card_lists_its_adapters(http):
    card = http.get("/v1/models/stabilityai/stable-diffusion-2-1").json()
    assert [a["name"] for a in card["loras"]] == ["ink", "pastel", "grain"]
    assert card["max_loras_per_request"] == 2 and card["allow_hub_loras"] is False
    assert http.get("/v1/models/stable-diffusion-xl-with-refiner").json()["loras"] == [
        {"name": "ink", "default_weight": 1.0}]
    assert "loras" not in http.get("/v1/models/esrgan-x2").json()


def test_livepeers_client_with_loras(base_url, http):
    from livepeer_ai import Livepeer
    from livepeer_ai.models import errors

    livepeer = Livepeer(http_bearer="unused", server_url=base_url, timeout_ms=300_000)
    request = {"prompt": "a lighthouse on a cliff", "width": 256, "height": 256, "seed": 21,
               "num_inference_steps": 3, "safety_check": False, "guidance_scale": 7.5}
    media = livepeer.generate.text_to_image(request={**request, "loras": '{"ink": 1.0}'}).image_response.images[0]
    inked = pixels(media.url.split(",", 1)[1])
    assert np.array_equal(inked, generate(http, {"ink": 1.0}, negative_prompt="", guidance_scale=7.5)[0])
    with pytest.raises(errors.HTTPError) as info:
        livepeer.generate.text_to_image(request={**request, "loras": '{"nope": 1.0}'})
    assert info.value.data.detail.msg.startswith("loras")
