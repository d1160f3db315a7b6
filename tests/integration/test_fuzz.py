"""Schemathesis against the app's own OpenAPI document, on the tiny profile: a bounded slice of
``benchmarks/fuzz.py``, with its image strategies, cheap values and checks.

Every operation, the multipart ones included, gets generated requests, valid and not, and
each answer is held to the document: no 5xx; its status one the document gives for the
operation, its content type one it gives for that status (``text/event-stream`` for a streamed
generation or edit), its body that status's schema; and every 4xx in its route's error shape
(OpenAI's envelope; Livepeer's shapes on Livepeer's routes). Valid uploads are what the
document says: its multipart file parts declare their image types (the requestBody's
``encoding``), and schemathesis draws those from real PNG, JPEG and WebP files, so the positive
cases on the multipart operations get past validation to a model.
"""

import subprocess
import sys

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import REPO_ROOT, benchmark_module

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def fuzz():
    """benchmarks/fuzz.py: what the script and this test share."""
    return benchmark_module("fuzz")


@pytest.fixture(scope="session")
def api_schema(base_url, fuzz):
    fuzz.register()
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")
SEEN: dict[str, set[int]] = {}
# Statuses of the positive (valid by the document) cases on the multipart operations.
VALID_UPLOADS: dict[str, list[int]] = {}


def test_the_document_describes_every_route(api_schema, fuzz):
    paths = set(api_schema.raw_schema["paths"])
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/images/variations",
            "/v1/images/upscale", "/v1/models", "/text-to-image", "/image-to-image", "/upscale",
            "/v1/images/jobs", "/health"} <= paths
    edit = api_schema.raw_schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in edit
    for path in fuzz.MULTIPART:
        form = api_schema.raw_schema["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]
        assert form["encoding"]["image"]["contentType"] == "image/png, image/jpeg, image/webp", path


@schema.parametrize()
# derandomize: the same cases on every run, so CI is repeatable; change the examples by
# raising max_examples, not by luck.
@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_answer_is_one_the_document_gives(case, fuzz):
    # Read before the call: the cheap values (a before_call hook) replace the body, and
    # schemathesis revalidates a replaced body (a multipart one with file bytes in it no
    # longer reads as valid).
    positive = case.meta is not None and case.meta.generation.mode == schemathesis.GenerationMode.POSITIVE
    response = case.call(timeout=120)
    operation = f"{case.method} {case.path}"
    SEEN.setdefault(operation, set()).add(response.status_code)
    if positive and case.method == "POST" and case.path in fuzz.MULTIPART:
        VALID_UPLOADS.setdefault(case.path, []).append(response.status_code)
    case.validate_response(response, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance,
        response_schema_conformance, fuzz.error_envelope])


def test_the_fuzzer_reached_every_operation_with_valid_and_invalid_requests():
    assert len(SEEN) >= 10, SEEN
    statuses = set().union(*SEEN.values())
    assert any(code < 300 for code in statuses) and any(400 <= code < 500 for code in statuses), SEEN
    for operation in ("POST /v1/images/generations", "POST /v1/images/edits", "POST /v1/images/upscale"):
        assert any(400 <= code < 500 for code in SEEN[operation]), (operation, SEEN[operation])
    # The statuses the document was checked on: the OpenAI routes' validation errors are 400s
    # (never FastAPI's 422), Livepeer's are its 422s, the jobs routes' unknown ids 404s.
    assert 422 not in SEEN["POST /v1/images/generations"] and 400 in SEEN["POST /v1/images/generations"]
    assert 422 in SEEN["POST /text-to-image"], SEEN["POST /text-to-image"]
    assert 404 in SEEN["GET /v1/images/jobs/{job_id}"], SEEN["GET /v1/images/jobs/{job_id}"]


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits"])
def test_a_stream_is_an_answer_the_document_gives(api_schema, fuzz, path):
    """Whatever the generated cases hit, a streamed generation and edit are checked against
    the document: an event stream is one of their documented answers."""
    body = {"prompt": "a lighthouse", "stream": True, "partial_images": 1, "num_inference_steps": 2}
    if path.endswith("edits"):
        body = {**{k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in body.items()},
                "image": fuzz.encoded_image("PNG", (90, 120, 30), False)}
        case = api_schema[path]["POST"].Case(body=body, media_type="multipart/form-data")
    else:
        case = api_schema[path]["POST"].Case(body={**body, "size": "256x256"}, media_type="application/json")
    response = case.call(timeout=120)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"][0].startswith("text/event-stream")
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                             content_type_conformance, fuzz.error_envelope])


def test_valid_uploads_get_past_validation(fuzz):
    """The document says what a valid upload is, so the positive cases on the multipart
    operations reach a model: on each operation some are answered with images, and of all
    of them at least a third are not refused as malformed (400 or 422). Many still are, and
    rightly: the document cannot know each model's own bounds (a `size` or an output `width`
    too large for it, more steps than its limit, too few steps for the `strength`), the
    names it serves (a model, an adapter, an upscaler), or hold generators to the JSON shape
    of `loras` (its contentSchema: schemathesis sends any JSON text). On the tiny profile
    about half get past."""
    assert set(VALID_UPLOADS) == set(fuzz.MULTIPART), VALID_UPLOADS
    for path, statuses in VALID_UPLOADS.items():
        assert any(code < 300 for code in statuses), (path, statuses)
    statuses = [code for codes in VALID_UPLOADS.values() for code in codes]
    past = sum(code not in (400, 422) for code in statuses)
    assert 3 * past >= len(statuses), (past, len(statuses), VALID_UPLOADS)


def test_the_fuzz_script_runs_and_writes_its_results(base_url, tmp_path):
    """``python3 -m benchmarks.fuzz --smoke`` against the session's app: every operation in its
    table, the requests adding up, each failure (if any) with a curl command that reproduces it."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.fuzz", "--smoke",
                           "--url", base_url, "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    (written,) = tmp_path.glob("fuzz-*-smoke.md")
    text = written.read_text()
    assert done.returncode in (0, 1), done.stderr[-4000:]
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| `")]
    assert {row[0].strip("| `") for row in rows} >= {"POST /v1/images/generations", "POST /v1/images/edits",
                                                     "POST /upscale", "GET /health"}
    total = int(text.split(" requests in ")[0].rsplit("\n", 1)[-1])
    assert total >= 60 and total == sum(int(row[1]) + int(row[2]) for row in rows)
    failures = text.split("## Failures", 1)[1]
    assert (done.returncode == 0) == (failures.strip().startswith("None.")), failures[:2000]
    assert failures.count("curl ") >= failures.count(" requests: "), failures[:2000]
