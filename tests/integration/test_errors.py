"""Every failure answers in OpenAI's envelope with the right status and param."""

import openai
import pytest

pytestmark = pytest.mark.integration


def error_of(exc_info):
    body = exc_info.value.body
    assert set(body) == {"message", "type", "param", "code"}, body
    return body


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"n": 11}, "n"),
        ({"n": 0}, "n"),
        ({"size": "512"}, "size"),
        ({"size": "776x776"}, "size"),  # over 768x768's area
        ({"size": "1024x248"}, "size"),  # a side under min_side
        ({"model": "stable-diffusion-xl", "size": "300x300"}, "size"),
        ({"extra_body": {"num_inference_steps": 101}}, "num_inference_steps"),
        ({"extra_body": {"seed": -1}}, "seed"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_compression": 50}, "output_compression"),
        ({"response_format": "base64"}, "response_format"),
        ({"model": "stable-diffusion-xl-refiner"}, "model"),
        ({"extra_body": {"high_noise_frac": 0.5}}, "high_noise_frac"),
        ({"model": "stable-diffusion-xl-with-refiner", "extra_body": {"high_noise_frac": 1.5}},
         "high_noise_frac"),
        ({"extra_body": {"strength": 0.5}}, "strength"),
    ],
)
def test_bad_requests_are_400_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a cat", **kwargs)
    assert info.value.status_code == 400
    error = error_of(info)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(prompt="a cat", model="dall-e-3")
    error = error_of(info)
    assert (error["param"], error["code"]) == ("model", "model_not_found")


def test_missing_prompt_raw(http):
    response = http.post("/v1/images/generations", json={"n": 1})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("body", ['{"prompt": "a cat"', "prompt=a cat", ""])
def test_malformed_json_raw(http, body):
    response = http.post(
        "/v1/images/generations", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]


def test_unknown_route_is_404_in_the_envelope(http):
    response = http.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"
