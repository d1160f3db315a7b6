import pytest
from pydantic import ValidationError

from serve_app.protocol.request import parse_size
from serve_app.fronts.openai import ImageGenerationRequest


def test_defaults_follow_openai():
    req = ImageGenerationRequest(prompt="a cat")
    assert (req.n, req.response_format, req.output_format, req.size, req.model) == (
        1, "b64_json", "png", None, None,
    )


@pytest.mark.parametrize("size,expected", [("512x512", (512, 512)), ("768x1024", (768, 1024))])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["512", "512x", "x512", "512*512", "0x512", "512x512x3", " 512x512", "-8x8"])
def test_parse_size_rejects(size):
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size(size)


@pytest.mark.parametrize(
    "fields,param",
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": "a", "n": 11}, "n"),
        ({"prompt": "a", "size": "big"}, "size"),
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "output_format": "gif"}, "output_format"),
        ({"prompt": "a", "output_compression": 101}, "output_compression"),
        ({"prompt": "a", "response_format": "png"}, "response_format"),
        ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "a", "high_noise_frac": 1.0}, "high_noise_frac"),
        ({"prompt": "a", "high_noise_frac": 0}, "high_noise_frac"),
        ({"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "a", "steps": 3}, "steps"),
    ],
)
def test_invalid_fields_name_the_field(fields, param):
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest(**fields)
    assert info.value.errors()[0]["loc"] == (param,)


def test_size_auto_is_accepted():
    assert ImageGenerationRequest(prompt="a", size="auto").size == "auto"
