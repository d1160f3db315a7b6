"""What the OpenAPI document says, beyond what FastAPI derives from the wire models: what a
valid request is (an upload's types and byte bound, the form fields' patterns, the rules
between fields, exact integer bounds) and what each route answers (every status with its
body, the event stream beside JSON). The fronts' models take the schema helpers here
(``json_schema_extra``), their routes :func:`responses`; the ingress installs
:func:`install_openapi` on its app."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel, TypeAdapter

from serve_app.config import IngressConfig
from serve_app.protocol.request import MAX_SEED, Loras
from serve_app.protocol.responses import ErrorResponse
from serve_app.service.uploads import ALLOWED_FORMATS


# The formats serve_app/service/uploads.py opens (it reads an upload by its content, not
# by its file name or its part's Content-Type), as media types.
Image.init()  # Pillow's MIME table fills as its format plugins register
IMAGE_CONTENT_TYPES = tuple(Image.MIME[name] for name in ALLOWED_FORMATS)

UPLOAD_LIMITS = (
    "The ingress reads it by its content (not its file name or part Content-Type) and refuses, "
    "with a 400 naming the field, an empty, truncated or undecodable file and one of more than "
    "`ingress.max_upload_pixels` pixels (default 4096x4096 = 16777216). Each side must be at "
    "least the model's `limits.min_input_side` (by default its family's: 64 for SD 2.1 and "
    "SDXL, 8 for the upscalers), and an upscaler takes at most its "
    "`limits.max_input_pixels`. The whole request body is at most `ingress.max_upload_bytes` "
    "bytes (a 413 past it): this field's maxLength."
)


def upload_schema(schema: dict[str, Any]) -> None:
    """An upload's JSON schema: binary (OpenAPI 3.0's ``format`` beside 3.1's
    ``contentMediaType``), not empty. The image types of its part are the requestBody's
    ``encoding`` and its ``maxLength`` the configured byte limit: the ingress's OpenAPI
    document adds both, per app."""
    schema.update(format="binary", contentMediaType="application/octet-stream", minLength=1)


def _present(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A condition: ``name`` is given (not left out, not null)."""
    return {"required": [name], "properties": {name: schema}}


def request_schema(schema: dict[str, Any]) -> None:
    """The JSON schema of an images request: the rules between its fields that no field's
    own schema can say (planning refuses a request that breaks one, whatever the model).
    ``output_compression`` is for jpeg and webp (png, the default, has no quality);
    ``partial_images`` needs ``stream``; a stream is one image of one model (no upscale)."""
    fields = schema.get("properties", {})
    rules = []
    if "output_compression" in fields:
        rules.append({"if": _present("output_compression", {"type": "integer"}),
                      "then": _present("output_format", {"enum": ["jpeg", "webp"]})})
    if "stream" in fields:
        rules.append({"if": _present("partial_images", {"type": "integer"}),
                      "then": _present("stream", {"const": True})})
        one = {"n": {"const": 1}} | ({"upscale": {"type": "null"}} if "upscale" in fields else {})
        rules.append({"if": _present("stream", {"const": True}), "then": {"properties": one}})
    if rules:
        schema["allOf"] = schema.get("allOf", []) + rules


def form_schema(schema: dict[str, Any]) -> None:
    """A multipart form's JSON schema: an optional field is left out, never sent as null (a
    form part is text, and ``null`` is no value of it), so the ``null`` branches (and the
    null defaults, which leaving the field out means) go.

    The rules between fields stay in the fields' descriptions, not in the schema: beside a
    binary part, schemathesis (4.32) checks ``allOf``, ``if`` and ``not`` with a validator
    that cannot read the part's bytes, and its negative cases fail to generate."""
    for field in schema.get("properties", {}).values():
        branches = field.get("anyOf")
        if not branches or {"type": "null"} not in branches:
            continue
        rest = [branch for branch in branches if branch != {"type": "null"}]
        del field["anyOf"]
        if "default" in field and field["default"] is None:
            del field["default"]
        if len(rest) == 1:
            field.update({key: value for key, value in rest[0].items() if key not in field})
        else:
            field["anyOf"] = rest


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` references replaced by the definitions themselves."""
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)


# ``loras`` of a form or of Livepeer's runner: JSON text of this shape.
LORAS_JSON_SCHEMA = {"contentMediaType": "application/json",
                     "contentSchema": _inline_defs(TypeAdapter(Loras).json_schema())}


# --- what the routes answer ---------------------------------------------------------------

# What each error status means, wherever a route answers it (a route may say more of its own:
# ``responses(about=...)``). The gate answers 401 and 413 before the route (fronts/gate.py).
ERROR_MEANINGS: dict[int, str] = {
    400: "The request is invalid, or asks for more than the model allows: the message names "
         "the field at fault (`param`).",
    401: "No API key, or not one of the server's (`Authorization: Bearer <key>`). Documented "
         "only when the server has API keys.",
    404: "Not found: the message says what.",
    409: "In conflict with the resource's state: the message says what.",
    413: "The request body is larger than the server's limit (`ingress.max_upload_bytes`).",
    429: "The caller's own share of the image store is full of what cannot be evicted (its "
         "queued jobs' uploads): retry after `Retry-After` seconds, once some have run.",
    422: "A field of the wrong type or out of range, as FastAPI answers it: each error's "
         "`loc`, `msg` and `type`.",
    500: "A fault of the server, not of the request: the message says what, without a "
         "traceback.",
    503: "A model is at capacity (its queue is full), its replica failed, or it cannot start: "
         "a fault of the server, not of the request. Retry after `Retry-After` seconds.",
    504: "The request did not finish within the server's timeout (`ingress.request_timeout_s`) "
         "and was cancelled.",
}
# Headers the gate and the error mapping send with these statuses (protocol/errors.py).
ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`.", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "Seconds to wait before retrying "
                                         "(`ingress.retry_after_s`).",
                          "schema": {"type": "integer", "minimum": 0}}},
}
ERROR_HEADERS[429] = ERROR_HEADERS[503]

# One Server-Sent Event, as FastAPI documents an event stream (OpenAPI 3.2's ``itemSchema``,
# fastapi.sse): the event's name, and its data, a JSON object whose ``type`` is that name.
STREAM_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"type": "object", "required": ["type"],
                              "properties": {"type": {"type": "string"}}},
        },
    },
}
STREAM_DESCRIPTION = (
    "Images as JSON; with `stream: true`, Server-Sent Events: previews while the model "
    "denoises (`partial_images`), then the image, each event named after its data's `type`. "
    "A failure after the stream began is its last event, an `error` event in OpenAI's "
    "envelope's `error` shape."
)


def responses(
    *statuses: int,
    error: type[BaseModel] = ErrorResponse,
    models: dict[int, type[BaseModel]] | None = None,
    about: dict[int, str] | None = None,
    stream: bool = False,
    open_route: bool = False,
) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=``: each error status it answers (besides its success), in its
    front's error shape (``error``; ``models`` for a status whose body differs), described
    (``ERROR_MEANINGS``, or the route's own words in ``about``). Every route may answer a
    500; one behind the gate (not ``open_route``) a 401, which the document keeps only when
    the server has API keys. ``stream``: the success may be Server-Sent Events."""
    models, about = models or {}, about or {}
    codes = sorted({*statuses, 500} | (set() if open_route else {401}))
    answers: dict[int | str, dict[str, Any]] = {
        code: {"model": models.get(code, error), "description": about.get(code, ERROR_MEANINGS[code]),
               **({"headers": ERROR_HEADERS[code]} if code in ERROR_HEADERS else {})}
        for code in codes
    }
    if stream:
        answers[200] = {"description": STREAM_DESCRIPTION,
                        "content": {"text/event-stream": {"itemSchema": STREAM_EVENT}}}
    return answers


def request_body(json_model: type[BaseModel] | None = None, form: dict[str, Any] | None = None,
                 description: str = "") -> dict[str, Any]:
    """A route's ``openapi_extra`` for a body it reads itself (not through a FastAPI
    parameter): ``json_model``'s schema as ``application/json`` and ``form`` (a JSON schema)
    as ``multipart/form-data``, inlined (the route's models are not in the components)."""
    content: dict[str, Any] = {}
    if json_model is not None:
        content["application/json"] = {"schema": _inline_defs(json_model.model_json_schema())}
    if form is not None:
        content["multipart/form-data"] = {"schema": form}
    return {"requestBody": {"required": True, "content": content, "description": description}}


# FastAPI adds this 422 to every operation with parameters or a body, unless the route declares
# a 422 of its own (Livepeer's); the fronts answer validation errors with a 400 instead
# (fronts/error_handlers.py), so the document drops it.
_FASTAPI_422 = "#/components/schemas/HTTPValidationError"
SECURITY_SCHEME = "apiKey"


def install_openapi(api: FastAPI) -> None:
    """Serve ``api``'s OpenAPI document with what a valid upload is and what this server
    answers (built once)."""
    api.openapi = lambda: _document(api)


def _document(api: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, built once (on first use): FastAPI's, plus what a valid upload
    is and what this server answers, for client generators and fuzzers. Each multipart
    operation's file parts get their image types (the requestBody's ``encoding``) and a
    ``maxLength``: the body limit the ingress enforces (``ingress.max_upload_bytes``, which
    the constructor installs with the gate before any request; the config's default until
    then). The 401s stay, with the bearer scheme, only when the gate has API keys; FastAPI's
    default 422 goes. Integer bounds are written as integers, the seed's exactly (FastAPI's
    OpenAPI model keeps bounds as floats, and 2**63 - 1 as a float is 2**63, one past the
    largest seed)."""
    if api.openapi_schema is None:
        document = FastAPI.openapi(api)  # FastAPI's own, cached in api.openapi_schema
        gate = getattr(api.state, "gate", None)
        max_bytes = gate.max_body_bytes if gate else IngressConfig.model_fields["max_upload_bytes"].default
        _describe_uploads(document, max_bytes)
        _describe_answers(document, bool(gate and gate.api_keys))
        _integer_bounds(document)
    return api.openapi_schema


def _operations(document: dict[str, Any]):
    for path_item in document["paths"].values():
        yield from path_item.values()


def _describe_answers(document: dict[str, Any], keys: bool) -> None:
    for operation in _operations(document):
        answers = operation["responses"]
        if answers.get("422", {}).get("content", {}).get("application/json", {}).get(
                "schema", {}).get("$ref") == _FASTAPI_422:
            del answers["422"]
        if "401" in answers and not keys:
            del answers["401"]
        elif "401" in answers:
            operation["security"] = [{SECURITY_SCHEME: []}]
    components = document.setdefault("components", {})
    if keys:
        components["securitySchemes"] = {SECURITY_SCHEME: {
            "type": "http", "scheme": "bearer",
            "description": "One of the server's API keys (`SERVE_APP_API_KEYS`, `SERVE_APP_API_KEYS_FILE`)."}}
    # FastAPI's validation error models, once no operation answers with them.
    schemas = components.get("schemas", {})
    if _FASTAPI_422 not in str(document["paths"]):
        schemas.pop("HTTPValidationError", None)
        if "#/components/schemas/ValidationError" not in str(schemas):
            schemas.pop("ValidationError", None)


def _describe_uploads(document: dict[str, Any], max_bytes: int) -> None:
    schemas = document.get("components", {}).get("schemas", {})
    for operation in _operations(document):
        form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
        if form is None:
            continue
        ref = form["schema"].get("$ref", "")
        schema = schemas[ref.rsplit("/", 1)[-1]] if ref else form["schema"]
        files = [name for name, field in schema.get("properties", {}).items()
                 if field.get("format") == "binary"]
        for name in files:
            schema["properties"][name]["maxLength"] = max_bytes
        form["encoding"] = {name: {"contentType": ", ".join(IMAGE_CONTENT_TYPES)}
                            for name in files}


def _integer_bounds(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _integer_bounds(item)
    elif isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                bound = node.get(key)
                if isinstance(bound, float) and bound.is_integer():
                    node[key] = MAX_SEED if bound == float(MAX_SEED) else int(bound)
        for value in node.values():
            _integer_bounds(value)
