"""The OpenAPI document says what a valid upload is, and what the multipart forms take, so
that cases generated from it are accepted (no Ray: an app from the ingress's factory and its
document; the routes run over fake model handles)."""

import asyncio
import io
import re
import uuid
from collections import Counter

import pytest
import schemathesis
from fastapi import UploadFile
from hypothesis import HealthCheck, given, settings
from PIL import Image
from starlette.datastructures import Headers

from serve_app.config import IngressConfig, load_app_config
from serve_app.fronts import ingress
from serve_app.fronts.ingress import build_api
from serve_app.fronts.livepeer import LivepeerImageToImageForm, LivepeerUpscaleForm
from serve_app.fronts.openai import (
    IMAGE_CONTENT_TYPES,
    ImageEditForm,
    ImageVariationForm,
    UpscaleForm,
)
from serve_app.protocol.request import MAX_SEED, parse_size
from serve_app.protocol.sizes import SIZE_PATTERN
from serve_app.service.uploads import ALLOWED_FORMATS, decode_image
from tests.unit.fakes import fake_handles

FORMS = {
    "/v1/images/edits": ImageEditForm,
    "/v1/images/variations": ImageVariationForm,
    "/v1/images/upscale": UpscaleForm,
    "/image-to-image": LivepeerImageToImageForm,
    "/upscale": LivepeerUpscaleForm,
}
FILES = {path: {"image", "mask"} if path == "/v1/images/edits" else {"image"} for path in FORMS}
DEFAULT_MAX_BYTES = IngressConfig.model_fields["max_upload_bytes"].default
# The smallest side SD 2.1 edits take (the family's min_input_side): a valid upload anywhere.
SIDE = 64


def png(side: int = SIDE) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 40)).save(out, "PNG")
    return out.getvalue()


def upload(data: bytes, name: str = "image.png") -> UploadFile:
    return UploadFile(io.BytesIO(data), filename=name, headers=Headers({"content-type": "image/png"}))


def fresh_document(gate=None) -> dict:
    """The document as an app builds it the first time it is asked for, with ``gate`` on
    its state (as the ingress's constructor puts it there from its config)."""
    api = build_api()
    api.state.gate = gate
    return api.openapi()


@pytest.fixture
def document():
    return fresh_document()


def form_schema(document: dict, path: str) -> tuple[dict, dict]:
    """The multipart media type object of ``path``'s POST and its (resolved) schema."""
    form = document["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]
    name = form["schema"]["$ref"].rsplit("/", 1)[-1]
    return form, document["components"]["schemas"][name]


# --- what the document says --------------------------------------------------------------


@pytest.mark.parametrize("path", FORMS)
def test_every_file_part_is_a_binary_image_with_a_byte_bound(document, path):
    form, schema = form_schema(document, path)
    files = {name for name, field in schema["properties"].items() if field.get("format") == "binary"}
    assert files == FILES[path]
    assert form["encoding"] == {
        name: {"contentType": "image/png, image/jpeg, image/webp"} for name in files
    }
    for name in files:
        field = schema["properties"][name]
        assert field["type"] == "string" and field["contentMediaType"] == "application/octet-stream"
        assert field["minLength"] == 1 and field["maxLength"] == DEFAULT_MAX_BYTES
        assert "anyOf" not in field and "default" not in field
    image = schema["properties"]["image"]["description"]
    for words in ("PNG, JPEG or WebP", "`ingress.max_upload_pixels`", "`limits.min_input_side`",
                  "`limits.max_input_pixels`", "`ingress.max_upload_bytes`"):
        assert words in image, (path, words)
    assert "image" in schema["required"]


def test_the_limits_the_descriptions_name_are_the_defaults():
    from deployments.families import FAMILIES, SERVED_FAMILIES

    from serve_app.fronts.openapi import UPLOAD_LIMITS

    pixels = IngressConfig.model_fields["max_upload_pixels"].default
    assert f"= {pixels})" in UPLOAD_LIMITS
    sides = {capability: {FAMILIES[name].min_input_side for name in SERVED_FAMILIES
                          if capability in FAMILIES[name].capabilities}
             for capability in ("image-to-image", "upscale")}
    assert sides == {"image-to-image": {64}, "upscale": {8}}
    assert "64 for SD 2.1 and SDXL, 8 for the upscalers" in UPLOAD_LIMITS


def test_the_image_types_are_the_formats_the_ingress_decodes():
    Image.init()
    assert set(IMAGE_CONTENT_TYPES) == {Image.MIME[fmt] for fmt in ALLOWED_FORMATS}


@pytest.mark.parametrize("path", FORMS)
def test_form_fields_are_never_null_and_keep_their_bounds(document, path):
    _, schema = form_schema(document, path)
    for name, field in schema["properties"].items():
        assert field.get("type") != "null" and "anyOf" not in field, (path, name, field)
        assert field.get("default", "absent") is not None, (path, name)
    seed = schema["properties"]["seed"]
    assert seed["type"] == "integer" and seed["minimum"] == 0
    assert seed["maximum"] == MAX_SEED and type(seed["maximum"]) is int  # not 2**63, a float
    for name in ("n", "num_images_per_prompt", "num_inference_steps"):
        if name in schema["properties"]:
            assert type(schema["properties"][name]["minimum"]) is int


def test_the_json_routes_keep_their_nulls_and_exact_seeds(document):
    generation = document["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert {"type": "null"} in generation["seed"]["anyOf"]
    assert generation["seed"]["anyOf"][0]["maximum"] == MAX_SEED


@pytest.mark.parametrize("size", ["auto", "512x512", "8x99999", "1x1", "0x8", "512by512",
                                  "512x512 ", "123456x8", "-8x8", "", "AUTO"])
def test_the_size_pattern_is_what_the_size_parser_takes(document, size):
    try:
        parsed = size == "auto" or bool(parse_size(size))
    except ValueError:
        parsed = False
    assert bool(re.search(SIZE_PATTERN, size)) == parsed
    for path in ("/v1/images/edits", "/v1/images/variations"):
        assert form_schema(document, path)[1]["properties"]["size"]["pattern"] == SIZE_PATTERN


def test_rules_between_fields_are_in_the_json_schema_and_the_forms_descriptions(document):
    """The generations body says its rules between fields as conditions; a form says them
    in words (beside a binary part, schemathesis cannot check conditions: see form_schema)."""
    rules = document["components"]["schemas"]["ImageGenerationRequest"]["allOf"]
    stream = {"required": ["stream"], "properties": {"stream": {"const": True}}}
    assert {"if": {"required": ["output_compression"],
                   "properties": {"output_compression": {"type": "integer"}}},
            "then": {"required": ["output_format"],
                     "properties": {"output_format": {"enum": ["jpeg", "webp"]}}}} in rules
    assert {"if": stream, "then": {"properties": {"n": {"const": 1}, "upscale": {"type": "null"}}}} in rules
    assert any(rule["then"] == stream for rule in rules)  # partial_images needs stream
    for path in FORMS:
        schema = form_schema(document, path)[1]
        assert not {"allOf", "anyOf", "oneOf", "not", "if"} & set(schema), path
    edit = form_schema(document, "/v1/images/edits")[1]["properties"]
    assert "not png" in edit["output_compression"]["description"]
    assert "one image (n 1)" in edit["stream"]["description"]
    upscale = form_schema(document, "/v1/images/upscale")[1]["properties"]
    assert "not with height" in upscale["width"]["description"]


@pytest.mark.parametrize("path", ["/v1/images/edits", "/v1/images/variations", "/image-to-image"])
def test_loras_are_described_as_json_text(document, path):
    loras = form_schema(document, path)[1]["properties"]["loras"]
    assert loras["type"] == "string" and loras["contentMediaType"] == "application/json"
    shapes = loras["contentSchema"]["anyOf"]
    assert {shape["type"] for shape in shapes} == {"object", "array"}
    assert "$ref" not in str(loras["contentSchema"])  # self-contained, resolvable anywhere


def test_the_byte_bound_is_the_configured_body_limit():
    """The constructor installs the gate's settings from the config before any request;
    the document, built on first use, takes the limit from there."""
    from serve_app.fronts.gate import GateSettings

    document = fresh_document(GateSettings(max_body_bytes=123_456))
    for path in FORMS:
        form, schema = form_schema(document, path)
        assert {schema["properties"][name]["maxLength"] for name in form["encoding"]} == {123_456}


# --- what the forms take -----------------------------------------------------------------


@pytest.mark.parametrize("path", FORMS)
def test_required_fields_defaults_and_examples_validate(document, path):
    """A form of the required fields (the upload: a PNG of the smallest side a model
    takes; text: its example, else a word) and every default and example the document
    shows validates as the route's model, and its upload decodes."""
    _, schema = form_schema(document, path)
    form = FORMS[path]
    values = {}
    for name in schema["required"]:
        field = schema["properties"][name]
        binary = field.get("format") == "binary"
        values[name] = upload(png()) if binary else field.get("examples", ["a red fox"])[0]
    validated = form.model_validate(values)
    validated.to_request()
    assert decode_image(asyncio.run(validated.image.read()), "image", 4096 * 4096).shape == (SIDE, SIDE, 3)
    for name, field in schema["properties"].items():
        for value in ([field["default"]] if "default" in field else []) + field.get("examples", []):
            form.model_validate({**values, name: value}).to_request()


# --- cases generated from the document, through the routes ------------------------------


class FakeStore:
    """The image store's handle: ``put_many.remote`` answers an id per image."""

    class _PutMany:
        @staticmethod
        async def remote(items, owner="", kind="image"):
            return [uuid.uuid4().hex for _ in items]

    put_many = _PutMany()


@pytest.fixture
def served(tiny_args, monkeypatch):
    """The app's routes over fake model handles on the tiny profile: the app the ingress's
    constructor builds, with its images service and gate on the app's state, as Serve gets it
    (``__serve_build_asgi_app__``). Serve is said to listen on loopback only: asking its
    controller would start Ray."""
    monkeypatch.setattr(ingress, "serve_listens_on", lambda: [])
    config = load_app_config(tiny_args)
    written = ingress.ImagesIngress.__bases__[0]  # the class as written, under serve.ingress
    instance = object.__new__(written)
    instance.__init__(config, fake_handles(config), FakeStore())
    return config, instance.__serve_build_asgi_app__()


def test_the_document_takes_the_byte_bound_from_the_config(served):
    config, api = served
    _, schema = form_schema(api.openapi(), "/v1/images/edits")
    assert schema["properties"]["image"]["maxLength"] == config.ingress.max_upload_bytes


def test_generated_valid_cases_are_accepted(served):
    """Positive cases schemathesis generates from the document, with a real image in each
    file part (what a fuzzer's media-type strategy or a client sends): the routes answer
    most with images, and refuse none for its upload or for a field's form. What they
    refuse, the document cannot know: each model's own bounds (a size or an output width
    too large for it, more steps than its limit), the names it serves (a model, an adapter,
    an upscaler), steps x strength under one step, and loras' JSON (its shape is the
    document's contentSchema, which generators do not read: they send any JSON text)."""
    _, api = served
    schema = schemathesis.openapi.from_asgi("/openapi.json", api)
    statuses: dict[str, Counter] = {path: Counter() for path in FORMS}
    refusals: list[dict] = []
    for path in FORMS:
        @given(case=schema[path]["POST"].as_strategy(schemathesis.GenerationMode.POSITIVE))
        @settings(max_examples=30, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            for name in FILES[path] & set(case.body):
                case.body[name] = png()
            case.body.pop("stream", None)  # the fake handles do not stream
            case.body.pop("partial_images", None)
            if isinstance(case.body.get("n"), int):
                case.body["n"] = min(case.body["n"], 2)  # valid and cheaper
            response = case.call()
            statuses[case.path][response.status_code] += 1
            if response.status_code >= 400:
                body = response.json()
                refusals.append(body.get("error") or body.get("detail"))

        run()
    everything = sum(statuses.values(), Counter())
    assert all(code < 500 for code in everything), statuses
    for path, counts in statuses.items():
        assert sum(counts.values()) >= 15 and any(code < 300 for code in counts), (path, counts)
    answered = sum(count for code, count in everything.items() if code < 300)
    assert answered >= everything.total() / 3, (statuses, refusals)
    for refusal in refusals:
        text = str(refusal)
        # Neither the upload nor a value's form: FastAPI's type errors (422s, or 400s
        # saying 'Input should be') and the upload's decoding never refuse a valid case.
        assert "loras" in text or ("Input should be" not in text and "Field required" not in text), refusal
        assert "'image'" not in text and "'mask'" not in text, refusal
