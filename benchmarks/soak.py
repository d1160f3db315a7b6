"""A soak with faults: a mixed load on the served app while model and safety-checker replicas
are killed.

    python3 -m benchmarks.soak [--duration-s 900] [--concurrency 4] [--kill-every-s 45]
                               [--url URL [--ray-address auto] [--app images]] [--out DIR] [--smoke]

Starts the tiny profile (``configs/tiny.yaml``, in this process, as the tests do), or targets a
running server at ``--url`` (the kills then join its Ray cluster at ``--ray-address``). After a
warm-up request of each kind (so that the on-demand models are up), ``--concurrency`` clients
send requests back to back for ``--duration-s``, each time one of these kinds, drawn with a
seeded generator:

- generations of SD 2.1, as base64 and as a URL (then fetched), and of SDXL -> refiner;
- generate, then upscale (SD 2.1 -> the x2 latent upscaler; SD 2.1 -> ESRGAN);
- edits, with and without a mask; variations;
- upscales (x2 latent, x4, ESRGAN);
- streams with previews (SD 2.1 and SDXL), read to their last event.

Every ``--kill-every-s`` a random replica of a model or of the safety checker is killed
(``ray.kill``, found by its actor name, ``SERVE_REPLICA::<app>#<deployment>#<id>``), running
or still starting; Serve starts another in its place. Each request's outcome is kept: a 200
whose body holds its images (a URL that answers; a stream that ends with
``image_generation.completed``), or else its status and cause (the error envelope's code and
message, the stream's ``error`` event, or the client's exception). Writes ``soak.md`` to
``--out`` (``soak-smoke.md`` with ``--smoke``: 40 s, a kill every 15 s, two clients; for
tests): requests by status and by kind, the non-200 share, the kills (with the deployment's
replicas by state just before), how many requests the ingress ran again after a loss (its
log), and each non-200's cause. Benchmarks measure; nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import machine, percentile, write_lines  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk"
CLIENT_TIMEOUT_S = 180  # past the tiny profile's 60 s request timeout: a 504 is the server's
# The replicas a kill may take: every model's and the safety checker's, never the ingress,
# the image store or the jobs consumer (their faults are not this benchmark's).
NOT_KILLED = {"ImagesIngress", "ImageStore", "JobsConsumer"}


@dataclass
class Outcome:
    """One request: when it was sent (seconds since the load began), what, how it ended."""

    kind: str
    sent_s: float
    took_s: float
    status: str  # "200", "503", "504", "stream error", "client error"...
    cause: str = ""  # for a non-200: the error code and message, or the exception


@dataclass
class Kill:
    at_s: float
    replica: str
    deployment: str
    states: str = ""  # the deployment's replicas just before the kill: "RUNNING 1", "STARTING 1"


@dataclass
class Soak:
    """A run's figures, as the report is written from them."""

    duration_s: float
    concurrency: int
    kill_every_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    runs_again: int | None = None  # the ingress's "running the request again" warnings; None: unread

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != "200"]

    def in_flight_at_kills(self) -> list[Outcome]:
        """Requests sent before a kill and answered after it."""
        return [o for o in self.outcomes
                if any(o.sent_s <= k.at_s <= o.sent_s + o.took_s for k in self.kills)]


# --- the requests ------------------------------------------------------------------------


def png(width: int, height: int, seed: int, mask: bool = False) -> bytes:
    """A seeded noise image; or a mask of the same size whose transparent middle is repainted."""
    import numpy as np
    from PIL import Image

    if mask:
        alpha = np.full((height, width), 255, np.uint8)
        alpha[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 0
        image = Image.fromarray(np.dstack([np.zeros((height, width, 3), np.uint8), alpha]), "RGBA")
    else:
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# kind: (route, JSON body or multipart fields, with an upload (size) or not, mask, stream)
KINDS: dict[str, dict] = {
    "generate b64": {"json": {"size": "512x512"}},
    "generate url": {"json": {"size": "512x512", "response_format": "url"}},
    "sdxl -> refiner": {"json": {"model": "stable-diffusion-xl-with-refiner", "size": "512x512"}},
    "generate -> x2 latent": {"json": {"size": "256x256", "upscale": "stable-diffusion-x2-latent-upscaler"}},
    "generate -> esrgan url": {"json": {"size": "256x256", "upscale": "esrgan-x2", "response_format": "url"}},
    "stream sd 2.1": {"json": {"size": "256x256", "stream": True, "partial_images": 2}},
    "stream sdxl": {"json": {"model": "stable-diffusion-xl", "size": "512x512", "stream": True,
                             "partial_images": 1}},
    "edit": {"route": "edits", "form": {"prompt": PROMPT, "size": "256x256", "strength": "0.8"}, "image": 256},
    "edit with mask": {"route": "edits", "form": {"prompt": PROMPT, "size": "256x256", "response_format": "url"},
                       "image": 256, "mask": True},
    "variation": {"route": "variations", "form": {"size": "256x256"}, "image": 256},
    "upscale x2 latent": {"route": "upscale", "form": {"prompt": PROMPT}, "image": 128},
    "upscale x4": {"route": "upscale", "form": {"model": "stable-diffusion-x4-upscaler"}, "image": 128},
    "upscale esrgan url": {"route": "upscale", "form": {"model": "esrgan-x2", "response_format": "url"},
                           "image": 128},
}


def error_cause(status: int, text: str) -> str:
    try:
        error = json.loads(text)["error"]
        return f"{error.get('code') or error.get('type')}: {error.get('message', '')[:160]}"
    except (ValueError, KeyError, TypeError):
        return text[:160]


async def send(client, url: str, kind: str, seed: int) -> tuple[str, str]:
    """Send one request of ``kind``; (status, cause): "200" when the answer holds its images."""
    spec = KINDS[kind]
    route = f"{url}/v1/images/{spec.get('route', 'generations')}"
    if "json" in spec:
        body = {"prompt": PROMPT, "seed": seed, **spec["json"]}
        if body.get("stream"):
            return await read_stream(client, route, body)
        response = await client.post(route, json=body)
    else:
        size = spec["image"]
        files = {"image": ("in.png", png(size, size, seed), "image/png")}
        if spec.get("mask"):
            files["mask"] = ("mask.png", png(size, size, seed, mask=True), "image/png")
        response = await client.post(route, data={**spec["form"], "seed": str(seed)}, files=files)
    if response.status_code != 200:
        return str(response.status_code), error_cause(response.status_code, response.text)
    (item,) = response.json()["data"]
    if "url" in item:  # the image store answers it
        image = await client.get(item["url"])
        if image.status_code != 200 or not image.content:
            return f"url {image.status_code}", f"GET {item['url'][-12:]}: {image.text[:120]}"
    elif not item.get("b64_json"):
        return "200 without an image", str(item)[:160]
    return "200", ""


async def read_stream(client, route: str, body: dict) -> tuple[str, str]:
    async with client.stream("POST", route, json=body) as response:
        if response.status_code != 200:
            return str(response.status_code), error_cause(response.status_code, (await response.aread()).decode())
        events = [json.loads(line[6:]) async for line in response.aiter_lines() if line.startswith("data: ")]
    kinds = [event["type"] for event in events]
    if kinds and kinds[-1] == "image_generation.completed" and "error" not in kinds:
        return "200", ""
    errors = [event["error"] for event in events if event["type"] == "error"]
    if errors:
        error = errors[0]
        return "stream error", f"{error.get('code') or error.get('type')}: {error.get('message', '')[:160]}"
    return "stream broken", f"events: {kinds}"


# --- the kills ---------------------------------------------------------------------------


def killable_replicas(app: str) -> list[tuple[str, str]]:
    """(actor name, deployment) of every live replica of a model or the safety checker."""
    import ray

    found = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if name.startswith(f"SERVE_REPLICA::{app}#"):
            deployment = name.split("#")[1]
            if deployment not in NOT_KILLED:
                found.append((name, deployment))
    return sorted(found)


def replica_states(app: str, deployment: str) -> str:
    """The deployment's replicas by state, as Serve's status says: "RUNNING 1"."""
    from ray import serve

    try:
        states = serve.status().applications[app].deployments[deployment].replica_states
    except Exception as exc:  # noqa: BLE001 - the report says so
        return f"unknown ({type(exc).__name__})"
    return ", ".join(f"{state} {count}" for state, count in sorted(states.items()) if count)


def kill_one(app: str, rng: random.Random) -> Kill | None:
    """Kill a random replica of a model or the safety checker, running or still starting
    (a kill every 45 s can take a replica that replaces the last one killed)."""
    import ray

    replicas = killable_replicas(app)
    if not replicas:
        return None
    name, deployment = rng.choice(replicas)
    states = replica_states(app, deployment)
    try:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    except ValueError:  # it went meanwhile (Serve stopping it)
        return None
    return Kill(0.0, name, deployment, states)


def count_runs_again(app: str) -> int | None:
    """The warnings of this app's ingress replicas for a request run again after a loss
    (serve_app/service/execution.py), from Ray's log folder on this machine; None when it is
    not here (a server elsewhere)."""
    try:
        import ray

        folder = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    except Exception:  # noqa: BLE001 - not connected, or not the head's machine
        return None
    logs = list(folder.glob(f"replica_{app}_ImagesIngress_*.log"))
    if not logs:
        return None
    return sum(path.read_text(errors="replace").count("running the request again") for path in logs)


# --- the run -----------------------------------------------------------------------------


async def soak(url: str, app: str, duration_s: float, concurrency: int, kill_every_s: float,
               seed: int, kill: bool = True) -> Soak:
    import httpx

    result = Soak(duration_s, concurrency, kill_every_s)
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        for index, kind in enumerate(KINDS):  # warm-up: every on-demand model starts now
            status, cause = await send(client, url, kind, 10**6 + index)
            print(f"warm-up {kind}: {status} {cause}", flush=True)
        start = time.monotonic()
        stop = start + duration_s

        async def client_loop(index: int) -> None:
            draw = random.Random(seed * 1000 + index)
            number = 0
            while time.monotonic() < stop:
                kind = draw.choice(list(KINDS))
                sent = time.monotonic()
                try:
                    status, cause = await send(client, url, kind, index * 100000 + number)
                except Exception as exc:  # noqa: BLE001 - a dropped connection, a client timeout: counted
                    status, cause = "client error", f"{type(exc).__name__}: {exc}"[:200]
                number += 1
                result.outcomes.append(Outcome(kind, sent - start, time.monotonic() - sent, status, cause))
                if status != "200":
                    print(f"{sent - start:7.1f} s {kind}: {status} {cause}", flush=True)

        async def killer() -> None:
            while True:
                await asyncio.sleep(max(0.0, start + (len(result.kills) + 1) * kill_every_s - time.monotonic()))
                if time.monotonic() >= stop:
                    return
                killed = await asyncio.to_thread(kill_one, app, rng)
                if killed is not None:
                    killed.at_s = time.monotonic() - start
                    result.kills.append(killed)
                    print(f"{killed.at_s:7.1f} s killed {killed.replica} ({killed.states})", flush=True)

        tasks = [client_loop(i) for i in range(concurrency)] + ([killer()] if kill else [])
        await asyncio.gather(*tasks)
    await asyncio.sleep(2)  # the ingress's last lines reach its log file
    result.runs_again = await asyncio.to_thread(count_runs_again, app)
    return result


# --- the report --------------------------------------------------------------------------


def write_report(result: Soak, out: Path, command: str, machine_text: str, smoke: bool) -> Path:
    outcomes, failed = result.outcomes, result.failed
    total = len(outcomes)
    share = len(failed) / total if total else 0.0
    caught = result.in_flight_at_kills()
    lines = [
        f"Soak with faults: `configs/tiny.yaml` under a mixed load of {len(KINDS)} kinds of request, "
        f"{result.concurrency} clients back to back for {result.duration_s:.0f} s, a random model or "
        f"safety-checker replica killed (`ray.kill`) every {result.kill_every_s:.0f} s. "
        f"Command: `{command}`. Machine: {machine_text}.",
        "",
        "| requests | 200 | not 200 | not-200 share | kills | requests in flight at a kill (of them 200) "
        "| requests run again after a loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {total} | {total - len(failed)} | {len(failed)} | {share:.2%} | {len(result.kills)} "
        f"| {len(caught)} ({sum(o.status == '200' for o in caught)}) "
        f"| {'not read' if result.runs_again is None else result.runs_again} |",
        "",
        "By status:",
        "",
        "| status | requests |",
        "| --- | --- |",
    ]
    for status, count in sorted(Counter(o.status for o in outcomes).items()):
        lines.append(f"| {status} | {count} |")
    lines += ["", "By kind:", "", "| kind | requests | not 200 | p50 | p99 |", "| --- | --- | --- | --- | --- |"]
    for kind in KINDS:
        mine = [o for o in outcomes if o.kind == kind]
        if mine:
            took = [o.took_s for o in mine if o.status == "200"] or [o.took_s for o in mine]
            lines.append(f"| {kind} | {len(mine)} | {sum(o.status != '200' for o in mine)} "
                         f"| {percentile(took, 50):.2f} s | {percentile(took, 99):.2f} s |")
    lines += ["", "Kills (a deployment's replicas, by state, as Serve's status had them just before):", "",
              "| at | deployment | replica | its replicas |", "| --- | --- | --- | --- |"]
    for k in result.kills:
        lines.append(f"| {k.at_s:.0f} s | {k.deployment} | `{k.replica.split('#')[-1]}` | {k.states} |")
    lines += ["", "Each request that did not end in a 200:", ""]
    if failed:
        lines += ["| sent at | kind | took | status | cause |", "| --- | --- | --- | --- | --- |"]
        for o in sorted(failed, key=lambda o: o.sent_s):
            cause = o.cause.replace("|", "/").replace("\n", " ")
            lines.append(f"| {o.sent_s:.0f} s | {o.kind} | {o.took_s:.1f} s | {o.status} | {cause} |")
    else:
        lines.append("none.")
    if smoke:
        lines += ["", "smoke run: a short run, to keep the script working; not figures to quote."]
    return write_lines(out, "soak-smoke.md" if smoke else "soak.md", lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=900.0, help="how long the load runs")
    parser.add_argument("--concurrency", type=int, default=4, help="clients sending back to back")
    parser.add_argument("--kill-every-s", type=float, default=45.0, help="seconds between kills")
    parser.add_argument("--seed", type=int, default=0, help="draws the kinds and the replicas killed")
    parser.add_argument("--url", help="a running server (default: start configs/tiny.yaml here)")
    parser.add_argument("--ray-address", default="auto", help="with --url: its Ray cluster, for the kills")
    parser.add_argument("--app", default="images", help="with --url: the Serve application's name")
    parser.add_argument("--no-kill", action="store_true", help="the same load without kills (a baseline)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="a short run (tests): 40 s, a kill every 15 s")
    opts = parser.parse_args()
    if opts.smoke:
        opts.duration_s, opts.kill_every_s, opts.concurrency = 40.0, 15.0, 2
    command = " ".join(["python3 -m benchmarks.soak", *sys.argv[1:]])

    def run(url: str, app: str) -> Soak:
        return asyncio.run(soak(url, app, opts.duration_s, opts.concurrency, opts.kill_every_s,
                                opts.seed, kill=not opts.no_kill))

    if opts.url:
        import ray

        ray.init(address=opts.ray_address, log_to_driver=False)
        result = run(opts.url.rstrip("/"), opts.app)
    else:
        from serve_app.tools.launch import run_local

        with run_local(ROOT / "configs" / "tiny.yaml") as url:
            result = run(url, "images")
    report = write_report(result, opts.out, command, machine("cpu"), opts.smoke)
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
