"""Stability's own Python SDK (stability-sdk 0.8.6), unchanged but for its host, against the
session's tiny app through Serve's gRPC proxy.

The SDK pins grpcio < 1.64 and protobuf < 6, which cannot be installed beside Ray, so it
gets a virtual environment of its own (tests/clients/stability-sdk.txt, built once per
session) and runs tests/clients/stability_sdk_client.py there; this process checks what it
answered against the HTTP routes and the model replicas' counters."""

import base64
import io
import json
import subprocess
import time
import venv

import numpy as np
import pytest
from PIL import Image
from ray import serve

from deployments.standins.tiny import SAFETY_CALIBRATION
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

CLIENTS = REPO_ROOT / "tests" / "clients"
IMAGE, OK, FILTER = 1, 0, 4  # generation.ARTIFACT_IMAGE, NULL, FILTER


@pytest.fixture(scope="session")
def sdk_python(tmp_path_factory):
    """The python of a fresh virtual environment holding only the SDK's pinned set."""
    root = tmp_path_factory.mktemp("stability-sdk")
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "-r", str(CLIENTS / "stability-sdk.txt")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return python


@pytest.fixture
def sdk(sdk_python, grpc_target, tmp_path):
    """``sdk(op, **kwargs)``: one SDK call in its own environment; its JSON answer."""

    def run(op, **spec):
        spec = {"op": op, "host": grpc_target, "out": str(tmp_path), **spec}
        done = subprocess.run([str(sdk_python), str(CLIENTS / "stability_sdk_client.py"),
                               json.dumps(spec)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run


def save(path, width, height, seed=0, mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return str(path)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def only_image(answer):
    assert "error" not in answer, answer
    (artifact,) = answer["artifacts"]
    assert (artifact["type"], artifact["mime"]) == (IMAGE, "image/png")
    return artifact


def test_upscale_with_esrgan_as_the_document_shows(sdk, tmp_path):
    artifact = only_image(sdk("upscale", engine="esrgan-v1-x2plus", init=save(tmp_path / "in.png", 64, 48)))
    assert artifact["size"] == [128, 96] and artifact["finish_reason"] == OK
    assert artifact["engine"] == "esrgan-v1-x2plus"


@pytest.mark.parametrize("side, expected", [({"width": 512}, [512, 384]), ({"height": 96}, [128, 96]),
                                            ({}, [256, 192])])
def test_x4_upscale_width_only_height_only_or_4x(sdk, tmp_path, side, expected):
    answer = sdk("upscale", engine="stable-diffusion-x4-latent-upscaler",
                 init=save(tmp_path / "in.png", 64, 48), prompt="a red car", seed=3, steps=3, **side)
    assert only_image(answer)["size"] == expected


def test_upscale_with_width_and_height_is_refused(sdk, tmp_path):
    answer = sdk("upscale", engine="esrgan-v1-x2plus", init=save(tmp_path / "in.png", 64, 48),
                 width=256, height=192)
    assert answer["error"]["code"] == "INVALID_ARGUMENT"
    assert answer["error"]["details"].startswith("image.width:")


def test_an_image_over_the_engines_pixel_limit_is_refused(sdk, tmp_path):
    # The document's limit for stable-diffusion-x4-latent-upscaler: 393216 input pixels.
    answer = sdk("upscale", engine="stable-diffusion-x4-latent-upscaler", init=save(tmp_path / "in.png", 800, 600))
    assert answer["error"]["code"] == "INVALID_ARGUMENT"
    assert answer["error"]["details"].startswith("prompt[0].artifact:")
    assert "393216" in answer["error"]["details"]


def test_an_unknown_engine_is_not_found(sdk):
    answer = sdk("generate", engine="stable-diffusion-v9-turbo", prompt="a cat", height=512, width=512)
    assert answer["error"]["code"] == "NOT_FOUND"
    assert "stable-diffusion-2-1" in answer["error"]["details"]
    assert "Traceback" not in answer["error"]["details"]


def test_generate_with_the_sdks_defaults(sdk):
    """generate(prompt) alone: the SDK's default engine (SDXL 1.0, started on demand here),
    1024x1024, a seed it draws, cfg_scale 7."""
    artifact = only_image(sdk("generate", prompt="a lighthouse"))
    assert artifact["size"] == [1024, 1024] and artifact["engine"] == "stable-diffusion-xl-1024-v1-0"
    assert artifact["finish_reason"] in (OK, FILTER) and artifact["index"] == 0


def test_generate_is_reproducible_by_seed(sdk):
    request = dict(engine="stable-diffusion-512-v2-1", prompt="a lighthouse at dusk", height=512,
                   width=512, samples=2, seed=42, steps=3)
    first, again = sdk("generate", **request), sdk("generate", **request)
    by_index = [{a["index"]: a for a in answer["artifacts"]} for answer in (first, again)]
    assert sorted(by_index[0]) == [0, 1]
    assert [by_index[0][i]["seed"] for i in (0, 1)] == [42, 43]
    for i in (0, 1):
        assert np.array_equal(pixels(by_index[0][i]["path"]), pixels(by_index[1][i]["path"]))
    assert not np.array_equal(pixels(by_index[0][0]["path"]), pixels(by_index[0][1]["path"]))


def test_filtered_images_come_back_blurred_as_the_http_route_returns_them(sdk, http):
    """The tiny checker's calibration request: the same seeds flag the same images on both
    fronts, and the pixels are the same (blurred where flagged)."""
    steps, prompt = SAFETY_CALIBRATION["steps"], SAFETY_CALIBRATION["prompt"]
    answer = sdk("generate", engine="stable-diffusion-768-v2-1", prompt=prompt, height=256, width=256,
                 samples=8, seed=1, steps=steps, cfg_scale=7.5)
    body = http.post("/v1/images/generations", json={
        "prompt": prompt, "size": "256x256", "n": 8, "seed": 1, "num_inference_steps": steps,
        "guidance_scale": 7.5}).json()
    flags = [item["nsfw"] for item in body["data"]]
    assert any(flags) and not all(flags), "the calibration request flags some images"
    artifacts = sorted(answer["artifacts"], key=lambda a: a["index"])
    assert [a["finish_reason"] == FILTER for a in artifacts] == flags
    assert [a["filtered"] for a in artifacts] == flags
    for artifact, item in zip(artifacts, body["data"]):
        assert artifact["seed"] == item["seed"]
        http_pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))
        assert np.array_equal(pixels(artifact["path"]), http_pixels.astype(np.int16))


def test_image_to_image_and_inpainting_give_the_http_edits_pixels(sdk, http, tmp_path):
    """start_schedule is the edit's strength, and Stability's mask (black: change) is OpenAI's
    (transparent: change) the other way round: the same image from both fronts."""
    init = save(tmp_path / "init.png", 512, 512, seed=1)
    mask = np.full((512, 512), 255, np.uint8)
    mask[128:384, 128:384] = 0  # black: change this square; white: keep
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    openai_mask = np.full((512, 512, 4), 255, np.uint8)
    openai_mask[128:384, 128:384, 3] = 0  # transparent: change the same square
    Image.fromarray(openai_mask, "RGBA").save(tmp_path / "openai-mask.png")
    common = dict(engine="stable-diffusion-512-v2-1", prompt="a garden", height=512, width=512,
                  seed=9, steps=6, cfg_scale=7.0, start_schedule=0.5)
    edited = only_image(sdk("generate", init=init, **common))
    inpainted = only_image(sdk("generate", init=init, mask=str(tmp_path / "mask.png"), **common))

    def http_edit(with_mask: bool):
        files = {"image": ("init.png", open(init, "rb"), "image/png")}
        if with_mask:
            files["mask"] = ("mask.png", open(tmp_path / "openai-mask.png", "rb"), "image/png")
        response = http.post("/v1/images/edits", files=files, data={
            "model": "stable-diffusion-2-1", "prompt": "a garden", "size": "512x512", "seed": "9",
            "num_inference_steps": "6", "guidance_scale": "7.0", "strength": "0.5"})
        assert response.status_code == 200, response.text
        data = base64.b64decode(response.json()["data"][0]["b64_json"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)

    assert edited["size"] == inpainted["size"] == [512, 512]
    assert np.array_equal(pixels(edited["path"]), http_edit(False))
    assert np.array_equal(pixels(inpainted["path"]), http_edit(True))
    assert not np.array_equal(pixels(inpainted["path"]), pixels(edited["path"]))


def test_the_engines_own_sampler_is_served_and_another_is_refused(sdk):
    request = dict(engine="stable-diffusion-512-v2-1", prompt="a cat", height=512, width=512, steps=2)
    only_image(sdk("generate", sampler="ddim", **request))
    answer = sdk("generate", sampler="k_euler", **request)
    assert answer["error"]["code"] == "INVALID_ARGUMENT"
    assert answer["error"]["details"].startswith("image.transform.diffusion:")
    assert "SAMPLER_DDIM" in answer["error"]["details"]


def replica_stats() -> dict:
    handle = serve.get_deployment_handle("stable-diffusion-2-1", app_name="images")
    return handle.stats.remote().result(timeout_s=30)


def test_a_cancelled_call_stops_the_work(sdk):
    before = replica_stats()
    answer = sdk("cancel", engine="stable-diffusion-768-v2-1", prompt="a slow fox", height=768,
                 width=768, steps=100, seed=1, cancel_after_s=1.5)
    assert answer["error"]["code"] == "CANCELLED"
    deadline = time.monotonic() + 30
    stats = replica_stats()
    while time.monotonic() < deadline and stats["cancelled_running"] == before["cancelled_running"]:
        time.sleep(0.2)
        stats = replica_stats()
    assert stats["cancelled_running"] > before["cancelled_running"]
    assert stats["steps"] - before["steps"] < 100
