"""The safety checker in a real app: the tiny profile (policy blur) and a strict side app
(policy reject, moderation 'low' refused). Which images the tiny checker flags is fixed by
the seeds; the tests learn it from the checker itself, loaded here with diffusers (the
oracle), and check the service against it."""

import base64
import io
import json

import numpy as np
import openai
import pytest
from PIL import Image

from deployments.standins.tiny import SAFETY_CALIBRATION
from tests.conftest import REPO_ROOT
from tests.integration.conftest import side_app

pytestmark = pytest.mark.integration

# The request the tiny checker was calibrated on: some of its images are flagged, some not.
REQUEST = {"prompt": SAFETY_CALIBRATION["prompt"], "size": "256x256", "n": 8, "seed": 0,
           "num_inference_steps": SAFETY_CALIBRATION["steps"], "guidance_scale": 7.5}


def decode(b64):
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def generate(http, url="", **fields):
    response = http.post(f"{url}/v1/images/generations", json={**REQUEST, **fields})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def oracle():
    """diffusers' StableDiffusionSafetyChecker on the tiny checker's weights, in this process."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    from deployments.standins.tiny import materialize_tiny

    folder = materialize_tiny("safety-checker")
    checker = StableDiffusionSafetyChecker.from_pretrained(folder, local_files_only=True).eval()
    processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)

    def flags(images):
        clip_input = processor(list(images), return_tensors="pt").pixel_values
        _, flagged = checker(clip_input=clip_input, images=np.zeros((len(images), 1)))
        return [bool(f) for f in flagged]

    return flags


@pytest.fixture(scope="module")
def as_made(http):
    """The calibration request with moderation 'low': images as made, their flags, and a
    flagged and a clean seed."""
    body = generate(http, moderation="low")
    images = [decode(item["b64_json"]) for item in body["data"]]
    flags = [item["nsfw"] for item in body["data"]]
    assert any(flags) and not all(flags), "the tiny checker should flag some images, not all"
    seeds = [item["seed"] for item in body["data"]]
    return {"images": images, "flags": flags,
            "flagged_seed": seeds[flags.index(True)], "clean_seed": seeds[flags.index(False)]}


def detail(image):
    return np.abs(np.diff(image.astype(int), axis=1)).mean()


def test_low_moderation_marks_the_images_the_checker_flags(as_made, oracle):
    assert len(as_made["flags"]) == 8
    assert as_made["flags"] == oracle(as_made["images"])


def test_blur_policy_blurs_flagged_images_only(http, as_made):
    body = generate(http)  # moderation 'auto': the tiny profile's policy is blur
    assert [item["nsfw"] for item in body["data"]] == as_made["flags"]
    for item, before, flag in zip(body["data"], as_made["images"], as_made["flags"]):
        after = decode(item["b64_json"])
        if flag:
            assert after.shape == before.shape and detail(after) < detail(before) / 4
        else:
            assert np.array_equal(after, before)


def test_openai_client_reads_the_flag(client, as_made):
    result = client.images.generate(
        prompt=REQUEST["prompt"], size="256x256", n=2, moderation="low",
        extra_body={"seed": as_made["flagged_seed"], "num_inference_steps": 4, "guidance_scale": 7.5},
    )
    assert result.data[0].to_dict()["nsfw"] is True
    assert np.array_equal(decode(result.data[0].b64_json), as_made["images"][as_made["flags"].index(True)])


def test_livepeer_reports_nsfw(http, as_made):
    for seed, expected in ((as_made["flagged_seed"], True), (as_made["clean_seed"], False)):
        response = http.post("/text-to-image", json={
            "prompt": REQUEST["prompt"], "width": 256, "height": 256, "seed": seed,
            "num_inference_steps": 4, "guidance_scale": 7.5})
        assert response.status_code == 200, response.text
        assert response.json()["images"][0]["nsfw"] is expected


def test_a_streamed_flagged_image_is_blurred_too(http, as_made):
    payload = {**REQUEST, "n": 1, "seed": as_made["flagged_seed"], "stream": True, "partial_images": 1}
    with http.stream("POST", "/v1/images/generations", json=payload) as response:
        body = "".join(response.iter_text())
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    final = events[-1]
    assert final["nsfw"] is True
    plain = generate(http, n=1, seed=as_made["flagged_seed"])["data"][0]
    assert np.array_equal(decode(final["b64_json"]), decode(plain["b64_json"]))


@pytest.fixture(scope="module")
def strict_url(base_url):
    with side_app(REPO_ROOT / "tests" / "integration" / "safety.yaml", base_url) as url:
        yield url


def test_reject_policy_refuses_a_request_with_a_flagged_image(http, strict_url, as_made):
    response = http.post(f"{strict_url}/v1/images/generations", json=REQUEST)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "moderation_blocked", "prompt", "image_generation_user_error")
    assert f"{sum(as_made['flags'])} of 8" in error["message"]
    clean = generate(http, strict_url, n=1, seed=as_made["clean_seed"])
    assert clean["data"][0]["nsfw"] is False


def test_reject_policy_through_the_openai_client(strict_url, as_made):
    client = openai.OpenAI(base_url=f"{strict_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt=REQUEST["prompt"], size="256x256",
                               extra_body={"seed": as_made["flagged_seed"]})
    assert info.value.code == "moderation_blocked"


def test_strict_app_refuses_low_moderation(http, strict_url):
    response = http.post(f"{strict_url}/v1/images/generations", json={**REQUEST, "moderation": "low"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "moderation"


def test_a_rejected_stream_ends_with_an_error_event(http, strict_url, as_made):
    payload = {**REQUEST, "n": 1, "seed": as_made["flagged_seed"], "stream": True, "partial_images": 2}
    with http.stream("POST", f"{strict_url}/v1/images/generations", json=payload) as response:
        body = "".join(response.iter_text())
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "moderation_blocked"
    assert all(e["type"] == "image_generation.partial_image" for e in events[:-1])
