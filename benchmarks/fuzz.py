"""Schema-driven fuzzing at scale: schemathesis over the app's own OpenAPI document.

    python3 -m benchmarks.fuzz [--cases 10000] [--seed 0] [--url URL] [--smoke] [--out benchmarks/results]

Starts the tiny profile (``configs/tiny.yaml``, as the integration tests start it: a private
Ray instance through ``serve_app.tools.launch.run_local``), or talks to the app at ``--url``,
and runs schemathesis' engine on every operation of its ``/openapi.json``: the examples and
coverage (boundary values, missing and malformed fields, methods a route does not take) phases
once, and the fuzzing phase, valid (positive) and invalid (negative) requests, in rounds of new
seeds until ``--cases`` requests were sent. Multipart parts get real PNG, JPEG and WebP images (the
document's image types); valid values that cost model time are brought down (:func:`cheap`).

Each answer is checked: no 5xx; its status and content type are ones the document gives for
the operation, its body and headers the ones it gives for that status; a 4xx or 5xx body is
the route's error shape (OpenAI's envelope, Livepeer's on Livepeer's routes); an undeclared
method is a 405 naming the allowed ones. Writes ``fuzz-tiny.md`` (``fuzz-tiny-smoke.md`` with
``--smoke``; ``fuzz-<host>.md`` with ``--url``) to ``--out``: the requests per operation, by
mode, the statuses they got and the time they took, and every distinct failure with the
operations it hit and a curl command that sends its shortest request again. Exits 1 when
there is a failure.

Unlike the other scripts here this one checks, because a fuzzer's figure is what it found;
``tests/integration/test_fuzz.py`` runs a bounded slice of it in CI (the same image strategies,
cheap values and checks, through schemathesis' pytest plugin). ``--smoke`` sends about 60
requests without the coverage phase (a check that the script works, not a fuzzing run).
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import schemathesis  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

# Fields whose valid values cost model time; values above these are brought down (invalid
# ones, like n=0 or n=11, are kept: they are cheap and the point).
CHEAP = {"n": 2, "num_images_per_prompt": 2, "num_inference_steps": 3}
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
    """A ``fmt`` file of IMAGE_SIDE pixels a side, a quarter of it transparent if asked."""
    image = Image.new("RGBA" if transparent else "RGB", (IMAGE_SIDE, IMAGE_SIDE), color)
    if transparent:
        image.paste((0, 0, 0, 0), (0, 0, IMAGE_SIDE // 2, IMAGE_SIDE // 2))
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def images(fmt: str) -> st.SearchStrategy[bytes]:
    return st.builds(encoded_image, st.just(fmt), st.tuples(*[st.integers(0, 255)] * 3),
                     st.booleans() if fmt != "JPEG" else st.just(False))


def cheap(body: Any, path: str = "") -> Any:
    """``body`` with valid values that cost model time brought down (in place)."""
    if isinstance(body, dict):
        for name, top in CHEAP.items():
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and top < value <= 500:
                body[name] = top
        if path in LIVEPEER:
            # Livepeer's defaults (50-100 steps, 1024x576) are a long run on a CPU: a
            # request that leaves them out gets small ones.
            body.setdefault("num_inference_steps", 3)
            if path == "/text-to-image" and "width" not in body and "height" not in body:
                body.update(width=256, height=256)
    return body


def error_envelope(ctx, response, case) -> None:
    """An error's body is its route's shape: Livepeer's (``{"detail": {"msg"}}``, and
    FastAPI's 422 list) on Livepeer's routes, OpenAI's envelope everywhere else."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"a {response.status_code} whose body is not JSON: {response.text[:200]!r}") from None
    if case.path.rstrip("/") in LIVEPEER:
        assert isinstance(body, dict) and set(body) == {"detail"}, f"not Livepeer's error shape: {body}"
        if response.status_code == 422:
            assert all(set(e) == {"loc", "msg", "type"} for e in body["detail"]), body
        else:
            assert set(body["detail"]) == {"msg"} and body["detail"]["msg"], f"not Livepeer's error shape: {body}"
        return
    assert isinstance(body, dict) and set(body) == {"error"}, f"not OpenAI's error envelope: {body}"
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, f"not OpenAI's error envelope: {body}"
    assert isinstance(error["message"], str) and error["message"], f"an error without a message: {body}"


_registered = False


def register() -> None:
    """Teach schemathesis (process-wide) what the app takes and how to check it: real images
    for the document's image types, cheap values in every request, the error-shape check.

    A binary part drawn from its schema (the negative cases) is text: schemathesis 4.32 checks
    some mutated bodies with a JSON Schema validator that cannot read its own binary values
    (ValueError: Unsupported type: 'Binary'), and would fail a run now and then."""
    global _registered
    if _registered:
        return
    _registered = True
    for media_type, fmt in IMAGE_FORMATS.items():
        schemathesis.openapi.media_type(media_type, images(fmt))
    schemathesis.openapi.format("binary", st.binary().map(lambda data: data.decode("latin-1")))
    schemathesis.check(error_envelope)

    @schemathesis.hook
    def before_call(context, case, **kwargs):
        # Every request, whichever phase made it (examples and coverage cases skip map_body).
        if isinstance(case.body, dict):
            cheap(case.body, case.path.rstrip("/"))


# What the run checks: schemathesis' own conformance checks and the error shapes. Left out:
# positive_data_acceptance and negative_data_rejection (the document cannot say each model's
# own bounds, so a schema-valid request may rightly be a 400), and the stateful checks.
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance", "unsupported_method",
          "error_envelope")


def config(seed: int, max_examples: int, workers: int, first: bool = True, smoke: bool = False):
    """schemathesis' configuration of a round (as its schemathesis.toml would give it):
    ``max_examples`` fuzzed cases an operation, of either mode. The examples and coverage
    phases are the same requests whatever the seed, so only the first round runs them (and
    not a smoke run's coverage: it alone sends hundreds)."""
    from schemathesis.config import SchemathesisConfig

    checks: dict[str, Any] = {"enabled": False}
    checks.update({name: {"enabled": True} for name in CHECKS})
    return SchemathesisConfig.from_dict({
        "seed": seed,
        "continue-on-failure": True,
        "request-timeout": 180,
        "workers": workers,
        "generation": {"mode": "all", "max-examples": max_examples, "no-shrink": True,
                       "deterministic": True, "database": "none"},
        "phases": {"stateful": {"enabled": False}, "examples": {"enabled": first},
                   "coverage": {"enabled": first and not smoke}},
        "checks": checks,
    })


# Headers of schemathesis' own or the HTTP client's, left out of a reproduction.
_CLIENT_HEADERS = {"user-agent", "accept", "accept-encoding", "connection", "content-length",
                   "x-schemathesis-testcaseid"}


def reproduction(request, base_url: str, shown_url: str) -> str:
    """A shell command that sends ``request`` (schemathesis' recorded request) again, to
    ``shown_url`` in place of ``base_url``, and shows the answer's status and headers: curl
    with the body as text, or, for binary bodies (images), decoded from base64 on the way."""
    uri = shown_url + request.uri.removeprefix(base_url)
    parts = ["curl", "-sS", "-i", "-X", request.method]
    for name, values in request.headers.items():
        if name.lower() not in _CLIENT_HEADERS:
            parts += ["-H", f"{name}: {values[0]}"]
    if request.body is None:
        return shlex.join([*parts, uri])
    try:
        text = request.body.decode("utf-8")
    except UnicodeDecodeError:
        encoded = base64.b64encode(request.body).decode()
        return f"echo {encoded} | base64 -d | {shlex.join([*parts, '--data-binary', '@-', uri])}"
    return shlex.join([*parts, "--data-binary", text, uri])


@dataclass
class Failure:
    """One kind of failure: a check's verdict, on one or more operations, and the shortest
    request that got it (its reproduction)."""

    check: str
    title: str
    message: str
    status: int | None
    reproduction: str
    operations: dict[str, int] = field(default_factory=dict)  # operation -> requests

    @property
    def count(self) -> int:
        return sum(self.operations.values())


@dataclass
class Results:
    """Requests by operation and mode, statuses by operation, and the failures, one entry
    per (check, verdict, status, message) whichever operations share it."""

    base_url: str
    shown_url: str
    requests: collections.Counter = field(default_factory=collections.Counter)
    statuses: dict[str, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    seconds: collections.Counter = field(default_factory=collections.Counter)  # by operation
    failures: dict[tuple, Failure] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def record(self, recorder) -> None:
        """Count a scenario's requests and keep its failures (schemathesis' recorder)."""
        for case_id, interaction in recorder.interactions.items():
            node = recorder.cases.get(case_id)
            case = node.value if node is not None else None
            operation = case.operation.label if case is not None else recorder.label
            mode = case.meta.generation.mode.value if case is not None and case.meta is not None else "unknown"
            self.requests[(operation, mode)] += 1
            status = interaction.response.status_code if interaction.response is not None else 0
            self.statuses[operation][status] += 1
        for case_id, checks in recorder.checks.items():
            interaction = recorder.interactions.get(case_id)
            for check in checks:
                if check.failure_info is None:
                    continue
                failure = check.failure_info.failure
                status = interaction.response.status_code if interaction and interaction.response else None
                key = (check.name, failure.title, status, failure.message)
                command = (reproduction(interaction.request, self.base_url, self.shown_url)
                           if interaction is not None else check.failure_info.code_sample)
                if key not in self.failures:
                    self.failures[key] = Failure(check.name, failure.title, failure.message, status, command)
                elif len(command) < len(self.failures[key].reproduction):  # the shortest
                    self.failures[key].reproduction = command
                operations = self.failures[key].operations
                operations[failure.operation] = operations.get(failure.operation, 0) + 1


def fuzz(url: str, cases: int, seed: int, workers: int = 1, *, smoke: bool = False,
         shown_url: str | None = None, log=print) -> Results:
    """Rounds of schemathesis' engine on ``url``'s document, a new seed each, until at least
    ``cases`` requests were sent. Reproductions address ``shown_url`` (default: ``url``).
    ``smoke``: no coverage phase."""
    from schemathesis.engine import events, from_schema

    register()
    results = Results(base_url=url, shown_url=shown_url or url)
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config(seed, 1, workers))
    operations = sum(1 for operation in schema.get_all_operations() if operation.ok())
    round_ = 0
    while results.total < cases:
        # Fuzzed cases per operation, either mode; the first round's other phases add theirs.
        per_operation = max(1, math.ceil((cases - results.total) / operations))
        schema = schemathesis.openapi.from_url(
            f"{url}/openapi.json",
            config=config(seed + round_, per_operation, workers, first=round_ == 0, smoke=smoke))
        before, started = results.total, time.monotonic()
        for event in from_schema(schema).execute():
            if isinstance(event, events.ScenarioFinished):
                results.record(event.recorder)
                results.seconds[event.recorder.label] += event.elapsed_time
            elif isinstance(event, events.NonFatalError):
                results.errors.append(f"{event.label}: {event.info.title}: {event.info.message}"[:500])
            elif isinstance(event, events.FatalError):
                raise event.exception
        log(f"round {round_} (seed {seed + round_}, up to {per_operation} fuzzed an operation): "
            f"{results.total - before} requests in {time.monotonic() - started:.0f} s, "
            f"{results.total} in all, {len(results.failures)} distinct failures")
        round_ += 1
        if results.total == before:
            break
    return results


def report(results: Results, *, command: str, machine: str, target: str, seconds: float,
           smoke: bool) -> list[str]:
    """The results file's lines: what ran, requests and statuses per operation, failures."""
    operations = sorted({operation for operation, _ in results.requests},
                        key=lambda label: (label.split(" ", 1)[1], label))
    failed = sum(failure.count for failure in results.failures.values())
    lines = [
        "# Schema-driven fuzzing" + (" (smoke run: a check that the script works)" if smoke else ""),
        "",
        f"schemathesis {schemathesis.__version__} on every operation of {target}'s OpenAPI document: "
        "the examples, coverage and fuzzing phases, valid (positive) and invalid (negative) "
        "requests, real PNG, JPEG and WebP images in the multipart parts. Checks: "
        + ", ".join(f"`{name}`" for name in CHECKS) + ".",
        f"Machine: {machine}.",
        f"Command: `{command}`.",
        "",
        f"{results.total} requests in {seconds / 60:.1f} min ({results.total / max(seconds, 1e-9):.1f}/s); "
        f"{len(results.failures)} distinct failures ({failed} requests).",
        "",
        "| operation | positive | negative | statuses | time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for operation in operations:
        statuses = ", ".join(f"{code}: {count}" for code, count in sorted(results.statuses[operation].items()))
        lines.append(f"| `{operation}` | {results.requests[(operation, 'positive')]} "
                     f"| {results.requests[(operation, 'negative')]} | {statuses} "
                     f"| {results.seconds[operation]:.0f} s |")
    by_mode = collections.Counter()
    for (_, mode), count in results.requests.items():
        by_mode[mode] += count
    lines.append(f"| all | {by_mode['positive']} | {by_mode['negative']} | "
                 f"| {sum(results.seconds.values()):.0f} s |")
    lines += ["", "## Failures", ""]
    if not results.failures:
        lines.append("None.")
    else:
        lines += [f"Each with the shortest request that got it, sent again to {results.shown_url}.", ""]
    for number, failure in enumerate(results.failures.values(), 1):
        where = ", ".join(f"`{operation}` ({count})" for operation, count in failure.operations.items())
        lines += [f"{number}. {failure.check}: {failure.title}, status {failure.status}, "
                  f"{failure.count} requests: {where}", "",
                  *[f"    {line}".rstrip() for line in failure.message.strip().splitlines()], "",
                  "    ```bash", f"    {failure.reproduction}", "    ```", ""]
    if results.errors:
        lines += ["## Errors of the run (not answers of the app)", "",
                  *[f"- {error}" for error in results.errors]]
    return lines


def main() -> None:
    from benchmarks import common

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="requests to send, at least")
    parser.add_argument("--seed", type=int, default=0, help="the first round's seed")
    parser.add_argument("--workers", type=int, default=1, help="schemathesis' concurrent workers")
    parser.add_argument("--url", help="an app already running (default: start the tiny profile)")
    parser.add_argument("--smoke", action="store_true",
                        help="about 60 requests, no coverage phase: a check that the script works")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.smoke:
        args.cases = min(args.cases, 60)
    command = shlex.join(["python3", "-m", "benchmarks.fuzz", *sys.argv[1:]])
    started = time.monotonic()
    if args.url:
        url = args.url.rstrip("/")
        results = fuzz(url, args.cases, args.seed, args.workers, smoke=args.smoke)
        target, name = f"`{url}`", "fuzz-" + common.slug(url.split("//", 1)[-1])
    else:
        from serve_app.tools.launch import load_serve_config, run_local

        config_path = ROOT / "configs" / "tiny.yaml"
        with tempfile.TemporaryDirectory() as jobs_folder:
            jobs = {**load_serve_config(config_path)["applications"][0]["args"]["jobs"],
                    "data_folder": jobs_folder}
            with run_local(config_path, args_override={"jobs": jobs}) as url:
                started = time.monotonic()  # the run, not the app's start
                # Reproductions address `serve run configs/tiny.yaml` (its port is 8000).
                results = fuzz(url, args.cases, args.seed, args.workers, smoke=args.smoke,
                               shown_url="http://127.0.0.1:8000")
        target, name = "the tiny profile (`configs/tiny.yaml`)", "fuzz-tiny"
    seconds = time.monotonic() - started
    lines = report(results, command=command, machine=common.machine("cpu", "schemathesis", "hypothesis"),
                   target=target, seconds=seconds, smoke=args.smoke)
    path = common.write_lines(args.out, name + ("-smoke" if args.smoke else "") + ".md", lines)
    print("\n".join(lines[:12 + len(results.statuses)]))
    print(f"wrote {path}")
    sys.exit(1 if results.failures or results.errors else 0)


if __name__ == "__main__":
    main()
