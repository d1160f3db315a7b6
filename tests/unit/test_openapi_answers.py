"""The OpenAPI document says what each route answers: every status with its body in the route's
error shape, no FastAPI 422 where the route answers validation errors with a 400, the event
stream beside JSON where a route streams, and a 401 only on a server with API keys (no Ray:
an app from the ingress's factory and its document, as the ingress builds it). That the live
routes answer only what it says is tests/integration/test_fuzz.py's."""

import pytest

from serve_app.fronts.gate import OPEN_PATHS, OPEN_PREFIXES, GateSettings
from serve_app.fronts.ingress import build_api
from serve_app.fronts.livepeer import LIVEPEER_PATHS

STREAMED = {"/v1/images/generations", "/v1/images/edits"}
ERROR_REF = "#/components/schemas/ErrorResponse"
LIVEPEER_REF = "#/components/schemas/LivepeerHTTPError"


def document_of(gate: GateSettings | None) -> dict:
    """The document an app builds the first time it is asked for, with ``gate`` installed
    (as the ingress's constructor installs it from its config)."""
    api = build_api()
    api.state.gate = gate
    return api.openapi()


@pytest.fixture
def document():
    return document_of(GateSettings())


@pytest.fixture
def keyed():
    return document_of(GateSettings(api_keys=(b"sk-one",)))


def operations(document):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def schema_ref(answer: dict) -> str | None:
    return answer.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def test_fastapis_422_is_gone_and_livepeers_stays(document):
    """The OpenAI-shaped and jobs routes answer validation errors with a 400 in OpenAI's
    envelope (fronts/error_handlers.py); Livepeer's answer them with a 422 in its runner's shape."""
    for path, method, operation in operations(document):
        if path in LIVEPEER_PATHS:
            assert schema_ref(operation["responses"]["422"]) == "#/components/schemas/LivepeerHTTPValidationError"
            assert "400" in operation["responses"], path
        else:
            assert "422" not in operation["responses"], f"{method} {path}"
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert "ValidationError" not in document["components"]["schemas"]


def test_every_error_is_in_its_routes_shape_and_described(document):
    for path, method, operation in operations(document):
        errors = {code: answer for code, answer in operation["responses"].items() if code >= "400"}
        assert "500" in errors, f"{method} {path}: a server fault may happen anywhere"
        for code, answer in errors.items():
            assert answer["description"] and answer["description"] != "Successful Response"
            if path == "/health" and code == "503":
                assert schema_ref(answer) == "#/components/schemas/HealthResponse"
            elif path in LIVEPEER_PATHS and code != "422":
                assert schema_ref(answer) == LIVEPEER_REF, f"{method} {path} {code}"
            elif path not in LIVEPEER_PATHS:
                assert schema_ref(answer) == ERROR_REF, f"{method} {path} {code}"


def test_the_statuses_each_route_answers(document):
    """What the routes' code can answer: the images routes every error of a model run, the
    jobs routes their 404s and 409s, the gate's 413 wherever there is a body."""
    statuses = {f"{method.upper()} {path}": set(operation["responses"]) for path, method, operation in operations(document)}
    images = {"200", "400", "404", "413", "500", "503", "504"}
    for path in ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations", "/v1/images/upscale"):
        assert statuses[f"POST {path}"] == images, path
    livepeer = {"200", "400", "413", "422", "500", "503", "504"}
    for path in ("/text-to-image", "/image-to-image", "/upscale"):
        assert statuses[f"POST {path}"] == livepeer, path
    assert statuses["POST /v1/images/jobs"] == {"202", "400", "404", "409", "413", "429", "500", "503"}
    assert statuses["GET /v1/images/jobs/{job_id}"] == {"200", "404", "500"}
    assert statuses["POST /v1/images/jobs/{job_id}/cancel"] == {"200", "404", "409", "500"}
    assert statuses["GET /v1/models"] == {"200", "500"}
    assert statuses["GET /v1/models/{model_id}"] == {"200", "404", "500"}
    assert statuses["GET /v1/images/files/{image_id}"] == {"200", "404", "500", "503"}
    assert statuses["GET /health"] == {"200", "500", "503"}
    for path, method, operation in operations(document):
        assert ("413" in operation["responses"]) == ("requestBody" in operation or path == "/v1/images/jobs"), path


def test_the_headers_of_errors(document, keyed):
    """A 503 says when to retry; a 401 which scheme to use."""
    for path, method, operation in operations(document):
        if "503" in operation["responses"] and path != "/health":
            assert "Retry-After" in operation["responses"]["503"]["headers"], path
    assert "WWW-Authenticate" in keyed["paths"]["/v1/models"]["get"]["responses"]["401"]["headers"]


def test_jobs_answer_the_job_object(document):
    job = "#/components/schemas/JobObject"
    assert schema_ref(document["paths"]["/v1/images/jobs"]["post"]["responses"]["202"]) == job
    assert schema_ref(document["paths"]["/v1/images/jobs/{job_id}"]["get"]["responses"]["200"]) == job
    assert schema_ref(document["paths"]["/v1/images/jobs/{job_id}/cancel"]["post"]["responses"]["200"]) == job
    fields = document["components"]["schemas"]["JobObject"]["properties"]
    assert set(fields) == {"id", "object", "operation", "status", "priority", "created", "started",
                           "finished", "result", "error"}


def test_streams_are_documented_beside_json_where_a_route_streams(document):
    for path, method, operation in operations(document):
        content = operation["responses"].get("200", {}).get("content", {})
        if path in STREAMED:
            assert set(content) == {"application/json", "text/event-stream"}, path
            event = content["text/event-stream"]["itemSchema"]  # one event, as FastAPI writes it
            assert event["properties"]["data"]["contentMediaType"] == "application/json"
            assert "Server-Sent Events" in operation["responses"]["200"]["description"]
        else:
            assert "text/event-stream" not in content, path


def test_no_401_without_api_keys(document):
    for path, method, operation in operations(document):
        assert "401" not in operation["responses"] and "security" not in operation, f"{method} {path}"
    assert "securitySchemes" not in document["components"]


def test_with_api_keys_every_route_behind_the_gate_answers_401(keyed):
    """The gate asks for a key on every path but the open ones (fronts/gate.py), in the
    route's own error shape; the document says so, and names the bearer scheme."""
    scheme = keyed["components"]["securitySchemes"]
    assert [scheme_entry["scheme"] for scheme_entry in scheme.values()] == ["bearer"]
    (name,) = scheme
    for path, method, operation in operations(keyed):
        if is_open(path):
            assert "401" not in operation["responses"] and "security" not in operation, path
            continue
        answer = operation["responses"]["401"]
        assert schema_ref(answer) == (LIVEPEER_REF if path in LIVEPEER_PATHS else ERROR_REF), path
        assert operation["security"] == [{name: []}], path
    assert not is_open("/v1/images/generations") and is_open("/v1/images/files/{image_id}")


def test_the_jobs_body_is_documented_as_the_route_reads_it():
    """The route reads its body itself; the document still says what it takes: a generations
    job as JSON, the other operations as multipart with the route's image part."""
    body = build_api().openapi()["paths"]["/v1/images/jobs"]["post"]["requestBody"]["content"]
    json_body = body["application/json"]["schema"]
    assert json_body["properties"]["operation"]["const"] == "generations"
    steps = json_body["properties"]["input"]["properties"]["num_inference_steps"]["anyOf"][0]
    assert steps["maximum"] == 1000
    form = body["multipart/form-data"]
    assert form["schema"]["properties"]["operation"]["enum"] == ["edits", "variations", "upscale"]
    assert {"operation", "image", "prompt"} <= set(form["schema"]["required"])
    assert form["encoding"]["image"]["contentType"] == "image/png, image/jpeg, image/webp"
