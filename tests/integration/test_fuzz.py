"""Schemathesis against the app's own OpenAPI document, on the tiny profile.

Every operation, the multipart ones included, gets generated requests, valid and not: no
answer may be a 5xx, and every 4xx must be OpenAI's error envelope (Livepeer's shapes on
Livepeer's routes). Valid uploads are what the document says: its multipart file parts
declare their image types (the requestBody's ``encoding``), and schemathesis draws those
from the strategies registered here (real PNG, JPEG and WebP files), so the positive cases
on the multipart operations get past validation to a model.
"""

import io

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

pytestmark = pytest.mark.integration

# Fields whose valid values cost model time; generated values above these are brought
# down (invalid ones, like n=0 or n=11, are kept: they are cheap and the point).
_CHEAP = {"n": 2, "num_images_per_prompt": 2, "num_inference_steps": 3}


LIVEPEER = ("/text-to-image", "/image-to-image", "/upscale")
MULTIPART = ("/v1/images/edits", "/v1/images/variations", "/v1/images/upscale",
             "/image-to-image", "/upscale")

# Without a strategy of its own, schemathesis fills a binary part with random bytes or a
# 1x1 sample file: not an image the models take. These are: every upload one size, the
# smallest side SD 2.1 edits take, so a mask always fits its image; with alpha, part of it
# transparent (a mask must mark something to repaint).
IMAGE_SIDE = 64
IMAGE_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}


def encoded_image(fmt: str, color: tuple[int, int, int], transparent: bool) -> bytes:
    image = Image.new("RGBA" if transparent else "RGB", (IMAGE_SIDE, IMAGE_SIDE), color)
    if transparent:
        image.paste((0, 0, 0, 0), (0, 0, IMAGE_SIDE // 2, IMAGE_SIDE // 2))
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def images(fmt: str) -> st.SearchStrategy[bytes]:
    return st.builds(encoded_image, st.just(fmt), st.tuples(*[st.integers(0, 255)] * 3),
                     st.booleans() if fmt != "JPEG" else st.just(False))


def cheap(body, path: str = ""):
    if isinstance(body, dict):
        for field, top in _CHEAP.items():
            value = body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and top < value <= 500:
                body[field] = top
        if path in LIVEPEER:
            # Livepeer's defaults (50-100 steps, 1024x576) are a long run on a CPU: a
            # request that leaves them out gets small ones.
            body.setdefault("num_inference_steps", 3)
            if path == "/text-to-image" and "width" not in body and "height" not in body:
                body.update(width=256, height=256)
    return body


def register_uploads():
    """The document's image types get real images. And a binary part drawn from its schema
    (the negative cases) is text: schemathesis 4.32 checks some mutated bodies with a JSON
    Schema validator that cannot read its own binary values (ValueError: Unsupported type:
    'Binary'), and would fail the run now and then."""
    for media_type, fmt in IMAGE_FORMATS.items():
        schemathesis.openapi.media_type(media_type, images(fmt))
    schemathesis.openapi.format("binary", st.binary().map(lambda data: data.decode("latin-1")))


@pytest.fixture(scope="session")
def api_schema(base_url):
    register_uploads()
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")

    @schema.hook
    def map_body(context, body):
        return cheap(body, context.operation.path if context.operation is not None else "")

    return schema


schema = schemathesis.pytest.from_fixture("api_schema")
SEEN: dict[str, set[int]] = {}
# Statuses of the positive (valid by the document) cases on the multipart operations.
VALID_UPLOADS: dict[str, list[int]] = {}


def test_the_document_describes_every_route(api_schema):
    paths = set(api_schema.raw_schema["paths"])
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/images/variations",
            "/v1/images/upscale", "/v1/models", "/text-to-image", "/image-to-image", "/upscale",
            "/health"} <= paths
    edit = api_schema.raw_schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in edit
    for path in MULTIPART:
        form = api_schema.raw_schema["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]
        assert form["encoding"]["image"]["contentType"] == "image/png, image/jpeg, image/webp", path


@schema.parametrize()
# derandomize: the same cases on every run, so CI is repeatable; change the examples by
# raising max_examples, not by luck.
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_every_4xx_in_the_envelope(case):
    # Read before the body is replaced: schemathesis revalidates a replaced body, and a
    # multipart one with file bytes in it no longer reads as valid.
    positive = case.meta is not None and case.meta.generation.mode == schemathesis.GenerationMode.POSITIVE
    # Again here: cases built from the document's examples and defaults (Livepeer's 10
    # images of 1024x576 at 50 steps) do not pass through the map_body hook.
    case.body = cheap(case.body, case.path)
    response = case.call(timeout=120)
    SEEN.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
    if positive and case.method == "POST" and case.path in MULTIPART:
        VALID_UPLOADS.setdefault(case.path, []).append(response.status_code)
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400 and case.path in LIVEPEER:
        body = response.json()
        assert set(body) == {"detail"}, body
        if response.status_code == 422:
            assert all(set(e) == {"loc", "msg", "type"} for e in body["detail"]), body
        else:
            assert set(body["detail"]) == {"msg"} and body["detail"]["msg"], body
    elif response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def test_the_fuzzer_reached_every_operation_with_valid_and_invalid_requests():
    assert len(SEEN) >= 10, SEEN
    statuses = set().union(*SEEN.values())
    assert any(code < 300 for code in statuses) and any(400 <= code < 500 for code in statuses), SEEN
    for operation in ("POST /v1/images/generations", "POST /v1/images/edits", "POST /v1/images/upscale"):
        assert any(400 <= code < 500 for code in SEEN[operation]), (operation, SEEN[operation])


def test_valid_uploads_get_past_validation():
    """The document says what a valid upload is, so the positive cases on the multipart
    operations reach a model: on each operation some are answered with images, and of all
    of them at least a third are not refused as malformed (400 or 422). Many still are, and
    rightly: the document cannot know each model's own bounds (a `size` or an output `width`
    too large for it, more steps than its limit, too few steps for the `strength`), the
    names it serves (a model, an adapter, an upscaler), or hold generators to the JSON shape
    of `loras` (its contentSchema: schemathesis sends any JSON text). On the tiny profile
    about half get past."""
    assert set(VALID_UPLOADS) == set(MULTIPART), VALID_UPLOADS
    for path, statuses in VALID_UPLOADS.items():
        assert any(code < 300 for code in statuses), (path, statuses)
    statuses = [code for codes in VALID_UPLOADS.values() for code in codes]
    past = sum(code not in (400, 422) for code in statuses)
    assert 3 * past >= len(statuses), (past, len(statuses), VALID_UPLOADS)
