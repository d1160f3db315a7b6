import io
import zlib

import numpy as np
import pytest
from PIL import Image

from serve_app.protocol.errors import InvalidRequestError
from serve_app.service.uploads import decode_image, decode_mask, resize

LIMIT = 4096 * 4096


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def rgb_gradient(width=40, height=30):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 6, y * 8, np.full_like(x, 100)], -1).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_rgb_in_every_format(fmt):
    pixels = rgb_gradient()
    kw = {"quality": 100} if fmt != "PNG" else {}
    if fmt == "WEBP":
        kw = {"lossless": True}
    out = decode_image(encode(Image.fromarray(pixels), fmt, **kw), "image", LIMIT)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - pixels).max() <= (12 if fmt == "JPEG" else 0)


def test_rgba_is_composited_over_white():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :5, 3] = 255  # left half opaque red-ish, right half transparent
    out = decode_image(encode(Image.fromarray(rgba, "RGBA")), "image", LIMIT)
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[0, 9]) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "1", "CMYK"])
def test_other_modes_become_rgb(mode):
    image = Image.fromarray(rgb_gradient()).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(encode(image, fmt), "image", LIMIT)
    assert out.shape == (30, 40, 3)


def test_palette_with_transparency():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    image.info["transparency"] = 0
    out = decode_image(encode(image, transparency=0), "image", LIMIT)
    assert tuple(out[0, 0]) == (255, 255, 255)


def test_16_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)  # mode I;16
    out = decode_image(encode(image), "image", LIMIT)
    assert list(out[0, :, 0]) == [0, 128, 255]


def test_16_bit_rgb_png():
    # A 48-bit RGB PNG, written by hand (Pillow writes none): one row, white and black.
    raw = b"\x00" + b"\xff\xff" * 3 + b"\x00\x00" * 3
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", (2).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([16, 2, 0, 0, 0]))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    out = decode_image(png, "image", LIMIT)
    assert out.shape == (1, 2, 3) and tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (0, 0, 0)


@pytest.mark.parametrize(
    "data,needle",
    [
        (b"", "empty"),
        (b"this is not an image", "not an image"),
        (encode(Image.fromarray(rgb_gradient()))[:60], "could not be decoded"),
        (encode(Image.fromarray(rgb_gradient()), "GIF"), "GIF"),
        (encode(Image.fromarray(rgb_gradient()), "BMP"), "BMP"),
    ],
)
def test_bad_uploads_are_400_naming_the_field(data, needle):
    with pytest.raises(InvalidRequestError) as info:
        decode_image(data, "image", LIMIT)
    assert info.value.param == "image" and needle in info.value.message


def test_decompression_bomb_is_refused_before_decoding():
    # 20000 x 20000 of one colour compresses to a few hundred kilobytes.
    bomb = encode(Image.new("L", (20000, 20000)), compress_level=9)
    assert len(bomb) < 2_000_000
    with pytest.raises(InvalidRequestError) as info:
        decode_image(bomb, "mask", LIMIT)
    assert info.value.param == "mask" and "pixels" in info.value.message


def test_mask_alpha_marks_the_area_to_edit():
    rgba = np.full((4, 4, 4), 255, np.uint8)
    rgba[:2, :, 3] = 0  # top half transparent: repaint
    weights = decode_mask(encode(Image.fromarray(rgba, "RGBA")), "mask", LIMIT)
    assert weights[:2].min() == 255 and weights[2:].max() == 0


def test_opaque_alpha_mask_is_refused():
    opaque = np.full((4, 4, 4), 255, np.uint8)
    with pytest.raises(InvalidRequestError, match="no transparent pixels") as info:
        decode_mask(encode(Image.fromarray(opaque, "RGBA")), "mask", LIMIT)
    assert info.value.param == "mask"


def test_mask_without_alpha_uses_white():
    gray = np.zeros((4, 4), np.uint8)
    gray[:, 2:] = 255
    weights = decode_mask(encode(Image.fromarray(gray, "L")), "mask", LIMIT)
    assert weights[:, :2].max() == 0 and weights[:, 2:].min() == 255


def test_resize_is_exact_and_a_no_op_when_sized():
    pixels = rgb_gradient()
    assert resize(pixels, 40, 30) is pixels
    assert resize(pixels, 80, 61).shape == (61, 80, 3)


# ---------------------------------------------------------------------------------------
# Uploads cost what the model can use: checked from the header, decoded lean
# ---------------------------------------------------------------------------------------

from serve_app.service.uploads import UploadRule  # noqa: E402


def test_a_phone_photo_is_read_as_the_jpeg_it_is():
    """Phones save multi-picture JPEGs (MPO: the photo, then a depth map or preview);
    the first picture is the photo."""
    photo, second = Image.fromarray(rgb_gradient()), Image.new("RGB", (40, 30), (0, 0, 255))
    data = encode(photo, "MPO", save_all=True, append_images=[second], quality=100)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = decode_image(data, "image", LIMIT)
    assert out.shape == (30, 40, 3) and np.abs(out.astype(int) - rgb_gradient()).max() <= 12


def test_the_models_limit_is_checked_from_the_header_before_decoding():
    """The rule sees the header's size; the pixels (here cut short: decoding would fail)
    are never decoded when it refuses."""
    data = encode(Image.fromarray(rgb_gradient(400, 300)))[:200]
    seen = []

    def too_large(width, height):
        seen.append((width, height))
        raise InvalidRequestError("too large for the model", param="image")

    with pytest.raises(InvalidRequestError, match="too large for the model"):
        decode_image(data, "image", UploadRule(LIMIT, too_large))
    assert seen == [(400, 300)]


def test_16_bit_images_are_scaled_without_a_wide_copy_of_the_whole_image():
    import tracemalloc

    side = 1024
    values = (np.arange(side * side, dtype=np.uint32) % 65536).astype(np.uint16).reshape(side, side)
    data = encode(Image.fromarray(values))
    tracemalloc.start()
    out = decode_image(data, "image", LIMIT)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # The 16-bit array (2 B a pixel), the gray and RGB results (1 + 3 + 3): not 8 B a pixel
    # of float64 (numpy's allocations are traced; Pillow's own are not).
    assert peak < 10 * side * side, peak
    expected = ((values.astype(np.uint64) * 255 * 2 + 65535) // (65535 * 2)).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected)


def test_transparency_is_composited_as_pillow_does_within_one_level():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(rgba, "RGBA")), "image", LIMIT)
    background = Image.new("RGBA", (53, 37), (255, 255, 255, 255))
    pillow = np.asarray(Image.alpha_composite(background, Image.fromarray(rgba, "RGBA")).convert("RGB"))
    assert np.abs(out.astype(int) - pillow).max() <= 1


def test_a_large_jpeg_is_decoded_at_the_smallest_scale_the_model_can_use():
    photo = Image.fromarray(rgb_gradient(2048, 1536))
    data = encode(photo, "JPEG", quality=90)
    out = decode_image(data, "image", UploadRule(LIMIT, target=(512, 384)))
    assert out.shape == (384, 512, 3)  # a quarter of each side, not the whole 2048x1536
    out = decode_image(data, "image", UploadRule(LIMIT, target=(600, 400)))
    assert out.shape == (768, 1024, 3)  # half: a quarter would be smaller than asked
    assert decode_image(data, "image", LIMIT).shape == (1536, 2048, 3)
