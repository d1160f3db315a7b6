"""Bare pipeline vs served path, side by side in one run, on the tiny profile; and the
cold start of ``serve run configs/tiny.yaml``.

    python3 -m benchmarks.bench [--out benchmarks/results] [--requests 48]

Fair to both: the tiny model gets one thread (one core) bare and served alike
(``cpu_threads: 1``), leaving the other core to the serving layer, as a GPU leaves the
host's CPUs to it.

1. The bare limit: the tiny SD 2.1 pipeline called in this process (no Ray, no HTTP), at
   batch sizes 1, 2, 4 and 8: latency and images/s, and its own batch gain.
2. The served path: the SD 2.1 deployment of configs/tiny.yaml behind the ingress, driven
   over HTTP at concurrency 1, 4 and 16, with batching on and then off
   (max_batch_images 1): images/s and p50/p99 latency. The safety checker is left out here,
   so these figures measure the model's path alone. Then, with each setting, concurrency 16
   side by side with the bare pipeline: blocks of served requests and of bare calls taken in
   turn, so that the ratio is not the VM's drift between two runs minutes apart.
3. At concurrency 1, bare and served calls alternated, plus the same served call through
   a second app that has the tiny profile's safety checker (what the check costs), and the
   same pipeline behind Ray Serve's own floor (``common.serve_floor_app``: a FastAPI route,
   one deployment, fpng, base64): how much of the served overhead is this app's.

4. Cold start: ``serve run configs/tiny.yaml`` from its launch to the first 200 of
   ``/v1/models`` (the ingress answers), of a generation (the default model answers) and
   of ``/health`` (every deployment ready); from nothing (an empty cache) once, then with
   the tiny models' cache built, taken in turn with Ray Serve's own floors
   (``floor_apps.py``: a hello world, and one deployment loading the same tiny SD 2.1).

Writes ``tiny-cpu.md`` (a markdown table) and ``tiny-cpu.png`` (a plot) to ``--out``.
Benchmarks measure; nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import alternate, percentile, serve_floor_app, write_lines  # noqa: E402
from serve_app.tools.launch import load_serve_config, run_local  # noqa: E402

MODEL = "stable-diffusion-2-1"
SIZE = 512
MODEL_THREADS = 1  # torch threads of the tiny model, bare and served
PROMPT = "a lighthouse at dusk"


def tiny_args(max_batch_images: int, safety: bool = False) -> dict:
    """configs/tiny.yaml with only the SD 2.1 model, batching as given, and its safety
    checker only when asked."""
    args = load_serve_config(ROOT / "configs" / "tiny.yaml")["applications"][0]["args"]
    model = next(m for m in args["models"] if m["name"] == MODEL)
    model = {**model, "batching": {**model["batching"], "max_batch_images": max_batch_images},
             "cpu_threads": MODEL_THREADS}
    # None, not a missing key: run_local merges these args over the config's, so a missing
    # "safety" would keep the profile's checker in the runs meant to go without it.
    return {**args, "models": [model], "chains": [], "default_upscaler": None,
            **({} if safety else {"safety": None})}


def load_bare_pipeline():
    """The tiny SD 2.1 pipeline in this process, as a replica loads it."""
    from diffusers import StableDiffusionPipeline

    from deployments.standins.tiny import materialize_tiny

    import torch

    torch.set_num_threads(MODEL_THREADS)  # as the served replica's cpu_threads
    pipe = StableDiffusionPipeline.from_pretrained(materialize_tiny("sd21"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_bare(pipe, steps: int, rounds: int) -> dict[int, dict]:
    """The pipeline alone, at several batch sizes: the limit the server can approach."""
    import torch

    from deployments.runtime.arrays import generators, to_uint8

    results = {}
    with torch.inference_mode():
        for batch in (1, 2, 4, 8):
            times = []
            for i in range(rounds + 1):
                start = time.perf_counter()
                out = pipe(
                    prompt=[PROMPT] * batch, width=SIZE, height=SIZE, num_inference_steps=steps,
                    generator=generators(tuple(range(i, i + batch))), output_type="np",
                ).images
                to_uint8(out)
                if i:  # the first call warms up
                    times.append(time.perf_counter() - start)
            results[batch] = {
                "p50_s": statistics.median(times),
                "images_per_s": batch * len(times) / sum(times),
            }
            print(f"bare batch {batch}: {results[batch]}", flush=True)
    return results


async def drive(url: str, concurrency: int, total: int, warmup: bool = True) -> dict:
    """``total`` requests over HTTP, ``concurrency`` at a time (after one untimed request
    per client with ``warmup``)."""
    import httpx

    latencies: list[float] = []
    payload = {"prompt": PROMPT, "model": MODEL, "size": f"{SIZE}x{SIZE}"}
    queue = list(range(total))
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as client:
        async def worker():
            while queue:
                seed = queue.pop()
                start = time.perf_counter()
                response = await client.post(f"{url}/v1/images/generations",
                                             json={**payload, "seed": seed})
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)

        if warmup:  # one request per worker, not counted
            await asyncio.gather(*(client.post(f"{url}/v1/images/generations", json=payload)
                                   for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "images_per_s": total / elapsed,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
    }


def interleaved_c1(url: str, checked_url: str, floor_url: str, bare_call, rounds: int = 24) -> dict[str, float]:
    """Concurrency 1, bare and served calls alternated call by call (``rounds`` of one call
    each), so that the machine's drift hits all alike (this VM's speed varies by tens of
    percent from minute to minute). ``checked_url`` serves the same model with the safety
    checker, ``floor_url`` behind Ray Serve's floor."""
    import httpx

    payload = {"prompt": PROMPT, "model": MODEL, "size": f"{SIZE}x{SIZE}", "seed": 1}
    with httpx.Client(timeout=300) as client:
        calls = {  # every call with seed 1: the same image each time
            "bare": lambda _: bare_call(),
            "served_png": lambda _: client.post(f"{url}/v1/images/generations", json=payload).raise_for_status(),
            "served_jpeg": lambda _: client.post(
                f"{url}/v1/images/generations", json={**payload, "output_format": "jpeg"}
            ).raise_for_status(),
            "served_png_checked": lambda _: client.post(
                f"{checked_url}/v1/images/generations", json=payload).raise_for_status(),
            "floor_png": lambda _: client.post(
                f"{floor_url}/v1/images/generations", json=payload).raise_for_status(),
        }
        times = alternate(calls, rounds)
    return {label: statistics.median(values) for label, values in times.items()}


def side_by_side_c16(url: str, bare_call, rounds: int = 3, requests: int = 32) -> dict[str, float]:
    """Throughput at concurrency 16 beside the bare pipeline's: blocks of ``requests``
    served requests (16 at a time) and of 16 bare batch-1 calls in this process, taken in
    turn for ``rounds`` rounds (a block lasts seconds, so drift between blocks is small);
    medians of each label's images/s."""
    bare, served = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        for seed in range(16):
            bare_call(seed)
        bare.append(16 / (time.perf_counter() - started))
        # The app was warmed at concurrency 16 just before (bench_served): no warm-up here.
        served.append(asyncio.run(drive(url, 16, requests, warmup=False))["images_per_s"])
    return {"bare": statistics.median(bare), "served": statistics.median(served)}


def bare_call_factory(steps: int, pipe=None):
    """One image of the bare pipeline (``pipe``, loaded here when None) per call."""
    import torch

    from deployments.runtime.arrays import generators, to_uint8

    pipe = pipe if pipe is not None else load_bare_pipeline()

    def call(seed: int = 1):
        # OpenMP's thread count is per OS thread: set where the pipeline runs.
        torch.set_num_threads(MODEL_THREADS)
        with torch.inference_mode():
            out = pipe(prompt=PROMPT, width=SIZE, height=SIZE, num_inference_steps=steps,
                       generator=generators((seed,)), output_type="np").images
        return to_uint8(out)

    return call


def floor_model(steps: int):
    """For :func:`serve_floor_app`: the bare pipeline, built in the floor's replica."""
    def make_model():
        call = bare_call_factory(steps)
        return lambda seed: call(seed)[0]

    return make_model


def bench_served(pipe, total: int, steps: int) -> dict[str, dict]:
    from ray import serve

    from serve_app.app import build_app

    results: dict[str, dict] = {}
    with run_local(ROOT / "configs" / "tiny.yaml", args_override=tiny_args(8)) as url:
        serve.run(build_app(tiny_args(8, safety=True)), name="checked", route_prefix="/checked")
        serve.run(serve_floor_app(floor_model(steps)), name="floor", route_prefix="/floor")
        bare_call = bare_call_factory(steps, pipe)
        results["c1"] = interleaved_c1(url, f"{url}/checked", f"{url}/floor", bare_call)
        serve.delete("checked")
        serve.delete("floor")
        print(f"interleaved c=1: {results['c1']}", flush=True)
        for label, batch in (("batched", 8), ("unbatched", 1)):
            if label == "unbatched":
                serve.run(build_app(tiny_args(batch)), name="images", route_prefix="/")
            results[label] = {}
            for concurrency in (1, 4, 16):
                count = total if concurrency > 1 else max(12, total // 4)
                results[label][concurrency] = asyncio.run(drive(url, concurrency, count))
                print(f"served {label} c={concurrency}: {results[label][concurrency]}", flush=True)
            results[f"c16_{label}"] = side_by_side_c16(url, bare_call)
            print(f"c=16 side by side, {label}: {results[f'c16_{label}']}", flush=True)
    return results


THIS_APP, FLOOR_SD21, FLOOR_HELLO = "this app", "Serve floor, tiny SD 2.1", "Serve hello world"
URL = "http://127.0.0.1:8000"
# The probes of each app, in order: a generation is tried once /v1/models answers.
APP_PROBES = {"models": ("GET", "/v1/models", None),
              "generation": ("POST", "/v1/images/generations", {"prompt": PROMPT, "size": f"{SIZE}x{SIZE}"}),
              "health": ("GET", "/health", None)}
FLOOR_PROBES = {"generation": ("POST", "/", None)}
SERVE_RUN = {  # label: (command, probes)
    THIS_APP: (["serve", "run", "configs/tiny.yaml"], APP_PROBES),
    FLOOR_SD21: (["serve", "run", "--app-dir", "benchmarks", "floor_apps:tiny_sd21"], FLOOR_PROBES),
    FLOOR_HELLO: (["serve", "run", "--app-dir", "benchmarks", "floor_apps:hello"], FLOOR_PROBES),
}


def cold_start(label: str, cache: Path | None, timeout_s: float = 300) -> dict[str, float]:
    """Seconds from launching ``SERVE_RUN[label]`` to its first 200s (``cache``: the tiny
    models' cache to use; an empty folder starts from nothing). This app: /v1/models, a
    generation and /health; the floor apps (``floor_apps.py``): ``POST /``."""
    import signal
    import subprocess

    import httpx

    env = {**os.environ, **({"SERVE_APP_TINY_CACHE": str(cache)} if cache else {})}
    command, probes = SERVE_RUN[label]
    try:  # a server left running would answer for the one under test
        httpx.get(f"{URL}/", timeout=2)
        raise RuntimeError(f"something already answers on {URL}: stop it (serve shutdown; ray stop)")
    except httpx.TransportError:
        pass
    firsts: dict[str, float] = {}
    started = time.perf_counter()
    server = subprocess.Popen(command, cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(timeout=60) as client:
            while len(firsts) < len(probes) and time.perf_counter() - started < timeout_s:
                for name, (method, path, body) in probes.items():
                    if name in firsts or (name == "generation" and "models" in probes and "models" not in firsts):
                        continue
                    try:
                        if client.request(method, f"{URL}{path}", json=body).status_code == 200:
                            firsts[name] = time.perf_counter() - started
                    except httpx.HTTPError:
                        pass
                time.sleep(0.1)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        subprocess.run(["ray", "stop", "--force"], capture_output=True)
    print(f"cold start of {label} (tiny cache {cache}): {firsts}", flush=True)
    return firsts


def cold_starts(rounds: int = 3) -> tuple[dict[str, float], dict[str, list[dict[str, float]]]]:
    """This app from nothing (an empty tiny cache), once; then, the cache built, this app and
    the two floors of ``floor_apps.py`` taken in turn for ``rounds`` rounds, so that the
    machine's drift falls on all three alike."""
    import tempfile

    with tempfile.TemporaryDirectory() as cache:  # empty, then built by the first start
        from_nothing = cold_start(THIS_APP, Path(cache))
        built: dict[str, list[dict[str, float]]] = {label: [] for label in SERVE_RUN}
        for _ in range(rounds):
            for label in SERVE_RUN:
                built[label].append(cold_start(label, Path(cache)))
    return from_nothing, built


def png_encode_ms(pipe) -> float:
    """fpng (the ingress's default) on one tiny-model output of SIZE x SIZE, best of 5."""
    import numpy as np

    from serve_app.service.encoding import encode_image

    pixels = bare_call_factory(1, pipe)()[0]
    times = []
    for _ in range(5):
        started = time.perf_counter()
        encode_image(np.ascontiguousarray(pixels), "png")
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def cold_lines(from_nothing: dict[str, float], built: dict[str, list[dict[str, float]]]) -> list[str]:
    """The cold-start table: medians (and ranges) of the alternated runs, the cache built,
    and this app's one run from nothing."""
    def cell(runs: list[dict[str, float]], key: str) -> str:
        values = [run[key] for run in runs if key in run]
        if not values:
            return "n/a" if key != "generation" else "not within 300 s"
        if len(values) < len(runs):
            return f"{statistics.median(values):.1f} s ({len(runs) - len(values)} of {len(runs)} not within 300 s)"
        if len(values) == 1:
            return f"{values[0]:.1f} s"
        return f"{statistics.median(values):.1f} s ({min(values):.1f}-{max(values):.1f})"

    rounds = len(built[THIS_APP])
    lines = [
        "",
        f"Cold start (seconds from launching `serve run` to the first 200; with the cache built, "
        f"medians of {rounds} runs taken in turn, with their range; goal for this app: 20 s with "
        "the cache built, 30 s from nothing). The floors (`benchmarks/floor_apps.py`) are Ray "
        "Serve's own: a hello-world deployment (Ray, dashboard, Serve's controller and proxy "
        "starting), and one deployment that loads the same tiny SD 2.1 pipeline with diffusers and "
        "answers a PNG (no ingress, safety checker or image store):",
        "",
        "| `serve run` of | tiny cache | /v1/models (ingress up) | first image | /health (every deployment ready) |",
        "| --- | --- | --- | --- | --- |",
        f"| `configs/tiny.yaml` (this app) | built from nothing | {cell([from_nothing], 'models')} "
        f"| {cell([from_nothing], 'generation')} | {cell([from_nothing], 'health')} |",
        f"| `configs/tiny.yaml` (this app) | built | {cell(built[THIS_APP], 'models')} "
        f"| {cell(built[THIS_APP], 'generation')} | {cell(built[THIS_APP], 'health')} |",
        f"| `floor_apps:tiny_sd21` (Serve floor) | built | | {cell(built[FLOOR_SD21], 'generation')} | |",
        f"| `floor_apps:hello` (Serve floor) | | | {cell(built[FLOOR_HELLO], 'generation')} (an \"ok\", no image) | |",
    ]
    ours, floor, hello = ([run["generation"] for run in built[label] if "generation" in run]
                          for label in (THIS_APP, FLOOR_SD21, FLOOR_HELLO))
    if ours and floor and hello:
        lines += [
            "",
            f"- First image, this app minus the tiny SD 2.1 floor: "
            f"{statistics.median(ours) - statistics.median(floor):+.1f} s; the floor minus hello "
            f"world (importing diffusers and loading the model): "
            f"{statistics.median(floor) - statistics.median(hello):+.1f} s; hello world alone (Ray "
            f"and Serve starting): {statistics.median(hello):.1f} s.",
        ]
    return lines


def write_report(bare: dict, served: dict, steps: int, out: Path, cold: tuple, png_ms: float) -> Path:
    c1 = served["c1"]
    best_batch = max(bare, key=lambda b: bare[b]["images_per_s"])
    best = bare[best_batch]["images_per_s"]
    lines = [
        f"Tiny SD 2.1, {SIZE}x{SIZE}, {steps} steps, {os.cpu_count()} CPU cores, one replica; the "
        f"model runs on {MODEL_THREADS} torch thread bare and served alike. "
        "Command: `python3 -m benchmarks.bench`.",
        "",
        "| path | concurrency / batch | images/s | p50 latency | p99 latency |",
        "| --- | --- | --- | --- | --- |",
    ]
    for batch, row in bare.items():
        lines.append(f"| bare pipeline | batch {batch} | {row['images_per_s']:.2f} | "
                     f"{row['p50_s'] * 1000:.0f} ms | |")
    for label in ("batched", "unbatched"):
        for concurrency, row in served[label].items():
            lines.append(
                f"| served, {label} | {concurrency} | {row['images_per_s']:.2f} | "
                f"{row['p50_s'] * 1000:.0f} ms | {row['p99_s'] * 1000:.0f} ms |"
            )
    c16 = served["batched"][16]["images_per_s"]
    lines += [
        "",
        "Concurrency 1, bare and served calls alternated call by call (medians of 24 each):",
        "",
        "| bare pipeline | served, png | served, jpeg | served, png, safety checker "
        "| Ray Serve's floor, png |",
        "| --- | --- | --- | --- | --- |",
        f"| {c1['bare'] * 1000:.0f} ms | {c1['served_png'] * 1000:.0f} ms | {c1['served_jpeg'] * 1000:.0f} ms "
        f"| {c1['served_png_checked'] * 1000:.0f} ms | {c1['floor_png'] * 1000:.0f} ms |",
        "",
        f"- Served p50 at concurrency 1 minus bare p50: {(c1['served_png'] - c1['bare']) * 1000:+.0f} ms "
        f"with PNG output, {(c1['served_jpeg'] - c1['bare']) * 1000:+.0f} ms with JPEG; PNG encode "
        f"(fpng) {png_ms:.1f} ms; target: served p50 <= bare p50 + PNG encode + 15 ms, i.e. "
        f"an excess of {(c1['served_png'] - c1['bare']) * 1000 - png_ms:+.0f} ms against 15.",
        f"- Ray Serve's own floor for the same pipeline (`common.serve_floor_app`: a FastAPI "
        f"route, one deployment running the pipeline in a thread, fpng, base64, a JSON body "
        f"built by hand) minus bare: {(c1['floor_png'] - c1['bare']) * 1000:+.0f} ms; this app "
        f"minus the floor: {(c1['served_png'] - c1['floor_png']) * 1000:+.0f} ms.",
        f"- The safety checker (tiny, CPU) at concurrency 1: "
        f"{(c1['served_png_checked'] - c1['served_png']) * 1000:+.0f} ms, "
        f"{c1['served_png_checked'] / c1['served_png']:.2f}x the served latency without it.",
        f"- Served images/s at concurrency 16 / bare images/s, side by side (blocks of 32 "
        f"served requests and 16 bare batch-1 calls taken in turn, medians of 3 rounds): "
        f"{served['c16_unbatched']['served']:.2f} / {served['c16_unbatched']['bare']:.2f} = "
        f"**{served['c16_unbatched']['served'] / served['c16_unbatched']['bare']:.2f}** unbatched "
        f"(max_batch_images 1), {served['c16_batched']['served']:.2f} / "
        f"{served['c16_batched']['bare']:.2f} = "
        f"**{served['c16_batched']['served'] / served['c16_batched']['bare']:.2f}** batched "
        f"(target: >= 0.90). "
        + ("Batch 1 is the bare pipeline's best in the table above (batches lose on this CPU), "
           "so bare batch-1 calls are the limit. " if best_batch == 1 else
           f"The bare pipeline's best in the table above is batch {best_batch}: "
           f"{best / bare[1]['images_per_s']:.2f}x batch 1. ")
        + f"From the table's separate runs, minutes apart: {c16 / best:.2f} batched against "
        f"bare batch {best_batch}.",
        f"- Gain from batching, served at concurrency 16: "
        f"{c16 / served['unbatched'][16]['images_per_s']:.2f}x; the bare pipeline's own batch gain "
        f"(best / batch 1): {best / bare[1]['images_per_s']:.2f}x.",
    ]
    lines += cold_lines(*cold)
    report = write_lines(out, "tiny-cpu.md", lines)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, marker in (("batched", "o"), ("unbatched", "s")):
        xs = list(served[label])
        ax.plot(xs, [served[label][c]["images_per_s"] for c in xs], marker=marker, label=f"served, {label}")
    ax.axhline(best, linestyle="--", color="gray", label=f"bare pipeline, batch {best_batch}")
    ax.axhline(bare[1]["images_per_s"], linestyle=":", color="gray", label="bare pipeline, batch 1")
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 4, 16], labels=["1", "4", "16"])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("images/s")
    ax.set_title(f"Tiny SD 2.1 {SIZE}x{SIZE}, {steps} steps, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "tiny-cpu.png", dpi=120)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--requests", type=int, default=48, help="requests per served run")
    parser.add_argument("--rounds", type=int, default=6, help="timed calls per bare batch size")
    parser.add_argument("--cold-rounds", type=int, default=3,
                        help="cold starts of this app and of each floor, taken in turn")
    opts = parser.parse_args()
    steps = tiny_args(8)["models"][0]["defaults"]["num_inference_steps"]
    cold = cold_starts(opts.cold_rounds)
    pipe = load_bare_pipeline()
    bare = bench_bare(pipe, steps, opts.rounds)
    served = bench_served(pipe, opts.requests, steps)
    report = write_report(bare, served, steps, opts.out, cold, png_encode_ms(pipe))
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
