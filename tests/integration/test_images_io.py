"""Edits, variations, upscaling and chains through the seeds' own client code."""

import base64
import io
import shutil
import subprocess

import numpy as np
import openai
import pytest
import requests
from PIL import Image

pytestmark = pytest.mark.integration


def png_bytes(width=96, height=64, mode="RGB", fmt="PNG"):
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 90)], -1).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def decode(b64):
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "iron_man_image.png"
    path.write_bytes(png_bytes(96, 64))
    return path


# --- seed 000: Prem's x2 latent upscaler service --------------------------------------


def test_seed_000_requests_upscale(base_url, image_file):
    url = f"{base_url}/v1/images/upscale"
    files = {"image": open(image_file, "rb")}
    data = {
        "prompt": "Super high resolution image of iron man, highly detailed, real life.",
        "n": 1,
        "guidance_scale": 8,
    }
    response = requests.post(url, files=files, data=data, timeout=120)
    assert response.status_code == 200, response.text
    image_string = response.json()["data"][0]["b64_json"]
    img = Image.open(io.BytesIO(base64.decodebytes(bytes(image_string, "utf-8"))))
    assert img.size == (192, 128)  # x2 latent upscaler, the default


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_seed_000_curl_upscale(base_url, image_file, tmp_path):
    out = tmp_path / "iron_man_highres.json"
    subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{base_url}/v1/images/upscale",
         "-F", f"image=@{image_file}",
         "-F", "prompt=Super high resolution image of iron man, highly detailed, real life.",
         "-F", "n=2", "-F", "guidance_scale=8", "-F", "seed=11", "-o", str(out)],
        check=True, timeout=120,
    )
    import json

    body = json.loads(out.read_text())
    assert [d["seed"] for d in body["data"]] == [11, 12]
    assert all(decode(d["b64_json"]).size == (192, 128) for d in body["data"])


# --- seed 001: Stability's upscalers: engine names, width OR height, pixel limits -------


@pytest.mark.parametrize(
    "model,fields,size",
    [
        ("esrgan-v1-x2plus", {}, (192, 128)),
        ("esrgan-v1-x2plus", {"width": 300}, (300, 200)),
        ("stable-diffusion-x4-latent-upscaler", {}, (384, 256)),
        ("stable-diffusion-x4-latent-upscaler", {"height": 100, "seed": 3, "noise_level": 40}, (150, 100)),
        ("stable-diffusion-x2-latent-upscaler", {"width": 250}, (250, 167)),
    ],
)
def test_upscaler_output_sizes(http, model, fields, size):
    response = http.post(
        "/v1/images/upscale",
        data={"model": model, "prompt": "a cat", **{k: str(v) for k, v in fields.items()}},
        files={"image": ("in.png", png_bytes(96, 64), "image/png")},
    )
    assert response.status_code == 200, response.text
    assert decode(response.json()["data"][0]["b64_json"]).size == size


@pytest.mark.parametrize(
    "model,width,height,limit",
    [
        ("stable-diffusion-x4-upscaler", 769, 512, 393216),
        ("esrgan-x2", 1025, 1024, 1048576),
        ("stable-diffusion-x2-latent-upscaler", 1024, 1025, 1048576),
    ],
)
def test_upscaler_input_limits(http, model, width, height, limit):
    response = http.post(
        "/v1/images/upscale",
        data={"model": model},
        files={"image": ("big.png", png_bytes(width, height), "image/png")},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "image" and str(limit) in error["message"]


def test_width_and_height_together_is_400(http):
    response = http.post(
        "/v1/images/upscale", data={"width": "200", "height": "200"},
        files={"image": ("in.png", png_bytes(), "image/png")},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "height"


# --- seed 002: Prem's SD 2.1 edit through the openai client ----------------------------


def test_seed_002_edit_with_openai_client(client, image_file):
    response = client.images.edit(
        image=open(image_file, "rb"),
        prompt="astronaut floating in dark space, going down towards earth.",
        n=1,
        size="512x512",
        extra_body={"guidance_scale": 9, "num_inference_steps": 10, "seed": 7},
    )
    (item,) = response.data
    assert decode(item.b64_json).size == (512, 512) and item.model_extra["seed"] == 7


def test_edit_defaults_to_the_input_size_and_is_reproducible(client, tmp_path):
    path = tmp_path / "odd.png"
    path.write_bytes(png_bytes(101, 75))
    first = client.images.edit(image=open(path, "rb"), prompt="a fox", n=2, extra_body={"seed": 3})
    second = client.images.edit(image=open(path, "rb"), prompt="a fox", n=2, extra_body={"seed": 3})
    assert [decode(d.b64_json).size for d in first.data] == [(96, 72), (96, 72)]
    assert [d.b64_json for d in first.data] == [d.b64_json for d in second.data]


def test_inpainting_with_an_openai_mask(client, tmp_path):
    image = tmp_path / "image.png"
    image.write_bytes(png_bytes(128, 128))
    rgba = np.full((128, 128, 4), 255, np.uint8)
    rgba[:, 64:, 3] = 0  # transparent right half: repaint it
    mask = tmp_path / "mask.png"
    Image.fromarray(rgba, "RGBA").save(mask)

    def edit(**kw):
        response = client.images.edit(image=open(image, "rb"), prompt="a red fox",
                                      model="stable-diffusion-xl", extra_body={"seed": 1, "strength": 1.0}, **kw)
        return response.data[0].b64_json

    inpainted = edit(mask=open(mask, "rb"))
    assert decode(inpainted).size == (128, 128)
    assert inpainted != edit()  # the mask made it an inpainting run


def test_variations_with_openai_client(client, image_file):
    response = client.images.create_variation(
        image=open(image_file, "rb"), n=2, size="128x128", extra_body={"seed": 5}
    )
    assert [decode(d.b64_json).size for d in response.data] == [(128, 128)] * 2
    assert [d.model_extra["seed"] for d in response.data] == [5, 6]


@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("L", "JPEG"),
                                      ("CMYK", "JPEG"), ("RGB", "WEBP")])
def test_uploads_in_any_mode(http, mode, fmt):
    response = http.post(
        "/v1/images/edits", data={"prompt": "a fox"},
        files={"image": ("in", png_bytes(64, 64, mode, fmt), "application/octet-stream")},
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "route,files,param",
    [
        ("/v1/images/edits", {"image": ("x.png", b"", "image/png")}, "image"),
        ("/v1/images/edits", {"image": ("x.png", b"definitely not a png", "image/png")}, "image"),
        ("/v1/images/edits", {"image": ("x.png", png_bytes()[:100], "image/png")}, "image"),
        ("/v1/images/upscale", {"image": ("x.gif", png_bytes(fmt="GIF"), "image/gif")}, "image"),
        ("/v1/images/edits", {"image": ("x.png", png_bytes(64, 64), "image/png"),
                              "mask": ("m.png", png_bytes(32, 32, "RGBA"), "image/png")}, "mask"),
        ("/v1/images/edits", {"image": ("x.png", png_bytes(64, 64), "image/png"),
                              "mask": ("m.png", b"junk", "image/png")}, "mask"),
    ],
)
def test_bad_uploads_are_400(http, route, files, param):
    response = http.post(route, data={"prompt": "a fox"}, files=files)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_decompression_bomb_is_400_and_the_server_stays_healthy(http):
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, format="PNG", compress_level=9)
    response = http.post("/v1/images/upscale",
                         files={"image": ("bomb.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"
    assert http.get("/health").status_code == 200


def test_missing_image_is_400(http):
    response = http.post("/v1/images/edits", data={"prompt": "a fox"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"


# --- generate -> upscale chains --------------------------------------------------------


@pytest.mark.parametrize(
    "model,upscale,size",
    [
        ("stable-diffusion-2-1", "stable-diffusion-x2-latent-upscaler", (512, 512)),
        ("stable-diffusion-xl", "stable-diffusion-x2-latent-upscaler", (512, 512)),
        ("stable-diffusion-2-1", "stable-diffusion-x4-upscaler", (1024, 1024)),
        ("stable-diffusion-xl-with-refiner", "esrgan-v1-x2plus", (512, 512)),
    ],
)
def test_generate_then_upscale(client, model, upscale, size):
    request_size = "256x256"
    response = client.images.generate(
        model=model, prompt="a castle", n=2, size=request_size,
        extra_body={"upscale": upscale, "seed": 21},
    )
    assert [decode(d.b64_json).size for d in response.data] == [size] * 2
    assert [d.model_extra["seed"] for d in response.data] == [21, 22]
    assert response.size == f"{size[0]}x{size[1]}"


def test_sdxl_then_x2_upscales_the_decoded_image(client, http):
    """The x2 latent upscaler knows SD 2.1's latent space, not SDXL's: from SDXL the chain
    must hand over images, so it gives what upscaling the generated PNG gives."""
    x2 = "stable-diffusion-x2-latent-upscaler"
    # moderation "low": the checker marks but does not blur, so both paths return pixels as made.
    chained = client.images.generate(model="stable-diffusion-xl", prompt="a castle", size="256x256",
                                     moderation="low", extra_body={"upscale": x2, "seed": 31})
    alone = client.images.generate(model="stable-diffusion-xl", prompt="a castle", size="256x256",
                                   moderation="low", extra_body={"seed": 31})
    upscaled = http.post("/v1/images/upscale",
                         data={"model": x2, "prompt": "a castle", "seed": "31", "moderation": "low"},
                         files={"image": ("g.png", base64.b64decode(alone.data[0].b64_json), "image/png")})
    assert upscaled.status_code == 200, upscaled.text
    a = np.asarray(decode(chained.data[0].b64_json), dtype=int)
    b = np.asarray(decode(upscaled.json()["data"][0]["b64_json"]), dtype=int)
    assert a.shape == b.shape == (512, 512, 3)
    difference = np.abs(a - b)
    assert difference.max() <= 2, (difference.max(), (difference > 2).mean())


def test_edit_then_upscale(http):
    response = http.post(
        "/v1/images/edits", data={"prompt": "a fox", "upscale": "esrgan-x2", "size": "64x64"},
        files={"image": ("in.png", png_bytes(64, 64), "image/png")},
    )
    assert response.status_code == 200, response.text
    assert decode(response.json()["data"][0]["b64_json"]).size == (128, 128)


def test_unknown_upscaler_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a cat", extra_body={"upscale": "magic-x8"})
    assert info.value.body["param"] == "upscale"


# --- Livepeer's runner routes -----------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_livepeer_upscale_curl(base_url, image_file, tmp_path):
    out = tmp_path / "out.json"
    subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{base_url}/upscale",
         "-F", "model_id=stabilityai/stable-diffusion-x4-upscaler",
         "-F", f"image=@{image_file}", "-F", "prompt=A white cat", "-F", "seed=9", "-o", str(out)],
        check=True, timeout=120,
    )
    import json

    (media,) = json.loads(out.read_text())["images"]
    # nsfw: whatever the tiny checker says of this image (tests/integration/test_safety.py
    # covers what a flag does); Livepeer's shape has it as a bool.
    assert media["url"].startswith("data:image/png;base64,") and media["seed"] == 9
    assert isinstance(media["nsfw"], bool)
    image = decode(media["url"].split(",", 1)[1])
    assert image.size == (384, 256)


def test_livepeer_text_to_image(http):
    response = http.post("/text-to-image", json={
        "model_id": "stabilityai/stable-diffusion-xl-base-1.0", "prompt": "a cat", "width": 512,
        "height": 512, "num_images_per_prompt": 2, "seed": 4, "safety_check": True,
        "guidance_scale": 5.0, "negative_prompt": "dog", "num_inference_steps": 3,
    })
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert [m["seed"] for m in images] == [4, 5] and all(isinstance(m["nsfw"], bool) for m in images)
    assert decode(images[0]["url"].split(",", 1)[1]).size == (512, 512)


def test_livepeer_image_to_image(http):
    response = http.post(
        "/image-to-image",
        data={"model_id": "stable-diffusion-2-1", "prompt": "a fox", "strength": "0.6",
              "num_images_per_prompt": "2", "seed": "1", "guidance_scale": "7"},
        files={"image": ("in.png", png_bytes(64, 64), "image/png")},
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["images"]) == 2


@pytest.mark.parametrize(
    "payload,status,param",
    [
        ({"prompt": "a cat", "num_images_per_prompt": 11}, 422, "num_images_per_prompt"),
        ({"prompt": "a cat", "width": 640, "height": 1024}, 400, "width"),
        ({"prompt": "a cat", "model_id": "nope/nope"}, 400, "model_id"),
        ({"prompt": "a cat", "loras": '{"a/b": 1}'}, 400, "loras"),
        ({"prompt": "   "}, 422, "prompt"),
    ],
)
def test_livepeer_errors_name_livepeer_fields(http, payload, status, param):
    # Livepeer's runner shapes: {"detail": {"msg": ...}}, and FastAPI's 422 list.
    response = http.post("/text-to-image", json=payload)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    if status == 422:
        assert detail[0]["loc"] == ["body", param]
    else:
        assert detail["msg"].startswith(f"{param}: ")
