"""Bare pipeline vs served path, side by side in one run, on the tiny profile.

    python3 benchmarks/bench.py [--out benchmarks/results] [--requests 48]

1. The bare limit: the tiny SD 2.1 pipeline called in this process (no Ray, no HTTP), at
   batch sizes 1, 2, 4 and 8: latency and images/s, and its own batch gain.
2. The served path: the SD 2.1 deployment of configs/tiny.yaml behind the ingress, driven
   over HTTP at concurrency 1, 4 and 16, with batching on and then off
   (max_batch_images 1): images/s and p50/p99 latency. The safety checker is left out here,
   so these figures measure the model's path alone.
3. At concurrency 1, bare and served calls alternated, plus the same served call through
   a second app that has the tiny profile's safety checker: what the check costs.

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
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from serve_app.launch import load_serve_config, run_local  # noqa: E402

MODEL = "stable-diffusion-2-1"
SIZE = 512
PROMPT = "a lighthouse at dusk"


def tiny_args(max_batch_images: int, safety: bool = False) -> dict:
    """configs/tiny.yaml with only the SD 2.1 model, batching as given, and its safety
    checker only when asked."""
    args = load_serve_config(ROOT / "configs" / "tiny.yaml")["applications"][0]["args"]
    model = next(m for m in args["models"] if m["name"] == MODEL)
    model = {**model, "batching": {**model["batching"], "max_batch_images": max_batch_images}}
    args = {**args, "models": [model], "chains": [], "default_upscaler": None}
    if not safety:
        args.pop("safety", None)
    return args


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def load_bare_pipeline():
    """The tiny SD 2.1 pipeline in this process, as a replica loads it."""
    from diffusers import StableDiffusionPipeline

    from deployments.tiny import materialize_tiny

    pipe = StableDiffusionPipeline.from_pretrained(materialize_tiny("sd21"), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_bare(steps: int, rounds: int) -> dict[int, dict]:
    """The pipeline alone, at several batch sizes: the limit the server can approach."""
    import torch

    from deployments.arrays import generators, to_uint8

    pipe = load_bare_pipeline()
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


async def drive(url: str, concurrency: int, total: int) -> dict:
    """``total`` requests over HTTP, ``concurrency`` at a time."""
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

        # Warm-up: one request per worker, not counted.
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


def interleaved_c1(url: str, checked_url: str, bare_call, rounds: int = 4, samples: int = 6) -> dict[str, float]:
    """Concurrency 1, bare and served calls alternated so that the machine's drift hits both
    alike (this VM's speed varies by tens of percent from minute to minute). ``checked_url``
    serves the same model with the safety checker."""
    import httpx

    times: dict[str, list[float]] = {"bare": [], "served_png": [], "served_jpeg": [],
                                     "served_png_checked": []}
    payload = {"prompt": PROMPT, "model": MODEL, "size": f"{SIZE}x{SIZE}", "seed": 1}
    with httpx.Client(timeout=300) as client:
        calls = {
            "bare": bare_call,
            "served_png": lambda: client.post(f"{url}/v1/images/generations", json=payload).raise_for_status(),
            "served_jpeg": lambda: client.post(
                f"{url}/v1/images/generations", json={**payload, "output_format": "jpeg"}
            ).raise_for_status(),
            "served_png_checked": lambda: client.post(
                f"{checked_url}/v1/images/generations", json=payload).raise_for_status(),
        }
        for call in calls.values():
            call()  # warm
        for _ in range(rounds):
            for label, call in calls.items():
                for _ in range(samples):
                    start = time.perf_counter()
                    call()
                    times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def bare_call_factory(steps: int):
    import torch

    from deployments.arrays import generators, to_uint8

    pipe = load_bare_pipeline()

    def call():
        with torch.inference_mode():
            out = pipe(prompt=PROMPT, width=SIZE, height=SIZE, num_inference_steps=steps,
                       generator=generators((1,)), output_type="np").images
        return to_uint8(out)

    return call


def bench_served(total: int, steps: int) -> dict[str, dict]:
    from ray import serve

    from serve_app.app import build_app

    results: dict[str, dict] = {}
    with run_local(ROOT / "configs" / "tiny.yaml", args_override=tiny_args(8)) as url:
        serve.run(build_app(tiny_args(8, safety=True)), name="checked", route_prefix="/checked")
        results["c1"] = interleaved_c1(url, f"{url}/checked", bare_call_factory(steps))
        serve.delete("checked")
        print(f"interleaved c=1: {results['c1']}", flush=True)
        for label, batch in (("batched", 8), ("unbatched", 1)):
            if label == "unbatched":
                serve.run(build_app(tiny_args(batch)), name="images", route_prefix="/")
            results[label] = {}
            for concurrency in (1, 4, 16):
                count = total if concurrency > 1 else max(12, total // 4)
                results[label][concurrency] = asyncio.run(drive(url, concurrency, count))
                print(f"served {label} c={concurrency}: {results[label][concurrency]}", flush=True)
    return results


def write_report(bare: dict, served: dict, steps: int, out: Path) -> Path:
    c1 = served["c1"]
    best_batch = max(bare, key=lambda b: bare[b]["images_per_s"])
    best = bare[best_batch]["images_per_s"]
    lines = [
        f"Tiny SD 2.1, {SIZE}x{SIZE}, {steps} steps, {os.cpu_count()} CPU cores, one replica. "
        "Command: `python3 benchmarks/bench.py`.",
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
        "Concurrency 1, bare and served calls alternated in the same minutes (medians):",
        "",
        "| bare pipeline | served, png | served, jpeg | served, png, safety checker |",
        "| --- | --- | --- | --- |",
        f"| {c1['bare'] * 1000:.0f} ms | {c1['served_png'] * 1000:.0f} ms | {c1['served_jpeg'] * 1000:.0f} ms "
        f"| {c1['served_png_checked'] * 1000:.0f} ms |",
        "",
        f"- Served p50 at concurrency 1 minus bare p50: {(c1['served_png'] - c1['bare']) * 1000:+.0f} ms "
        f"with PNG output, {(c1['served_jpeg'] - c1['bare']) * 1000:+.0f} ms with JPEG (target: within 15 ms).",
        f"- The safety checker (tiny, CPU) at concurrency 1: "
        f"{(c1['served_png_checked'] - c1['served_png']) * 1000:+.0f} ms, "
        f"{c1['served_png_checked'] / c1['served_png']:.2f}x the served latency without it.",
        f"- Served images/s at concurrency 16 / bare best batched images/s (batch {best_batch}): "
        f"{c16 / best:.2f} (target: >= 0.90).",
        f"- Gain from batching, served at concurrency 16: "
        f"{c16 / served['unbatched'][16]['images_per_s']:.2f}x; the bare pipeline's own batch gain "
        f"(best / batch 1): {best / bare[1]['images_per_s']:.2f}x.",
    ]
    out.mkdir(parents=True, exist_ok=True)
    report = out / "tiny-cpu.md"
    report.write_text("\n".join(lines) + "\n")

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
    opts = parser.parse_args()
    steps = tiny_args(8)["models"][0]["defaults"]["num_inference_steps"]
    bare = bench_bare(steps, opts.rounds)
    served = bench_served(opts.requests, steps)
    report = write_report(bare, served, steps, opts.out)
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
