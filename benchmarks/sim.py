"""The serving layer at GPU speed: the served path around simulated H100s.

    python3 -m benchmarks.sim [--out benchmarks/results] [--smoke]

Every model replica here is a simulated accelerator (``sim:<family>``,
deployments/standins/sim.py, benchmarks only): the real deployment class, batcher, cancellation
and step callbacks around a pipeline that sleeps for the time a cost model fitted to
published H100 figures gives, and returns photo-like images. So the figures measure the
serving layer (HTTP, ingress, handle calls, batching, object store, PNG, base64, JSON)
on this machine's CPUs while the "GPUs" compute, as they would on a GPU node.

For SDXL 1024x1024 30 steps and SD 2.1 768x768 25 steps (batching and queue options of
configs/cluster.yaml), with 1 and 8 replicas (one simulated GPU each) and 1, 16 and 64
concurrent clients in a closed loop:

- served images/s / capacity, where capacity = the cost model's best batched rate (at
  most ``max_batch_images`` a batch) x replicas;
- p50 and p99 latency, and at concurrency 1 the served p50 minus the simulated model time
  (text encoders + steps + VAE decode of one image): what the serving layer adds;
- the mean batch size the replicas ran;
- at concurrency 1 with one replica, this app and Ray Serve's own floor for the same bytes
  (``common.serve_floor_app``) alternated request by request: how much of the
  overhead is ours.

Then, in this process, what the path's CPU steps cost for one image of each size: PNG
(fpng and zlib), base64, JSON.

Writes ``sim-h100.md`` to ``--out`` (``sim-h100-smoke.md`` with ``--smoke``: a small
model, short runs; for tests). Benchmarks measure; nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import alternate, percentile, serve_floor_app, write_lines  # noqa: E402
from deployments.standins.sim import COSTS  # noqa: E402
from serve_app.tools.launch import load_serve_config, run_local  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, film photograph"


@dataclass(frozen=True)
class Case:
    label: str
    family: str
    size: str
    steps: int

    @property
    def pixels(self) -> int:
        width, height = map(int, self.size.split("x"))
        return width * height


CASES = [Case("SDXL 1024x1024, 30 steps", "sdxl", "1024x1024", 30),
         Case("SD 2.1 768x768, 25 steps", "sd21", "768x768", 25)]
SMOKE_CASES = [Case("SD 2.1 256x256, 2 steps (smoke)", "sd21", "256x256", 2)]


def sim_args(case: Case, replicas: int) -> dict:
    """configs/cluster.yaml's model of ``case.family`` (its batching, queue and limits),
    its source simulated, ``replicas`` fixed replicas that reserve no GPU (a simulated GPU
    each); no safety checker, so the figures are the model's path alone."""
    cluster = load_serve_config(ROOT / "configs" / "cluster.yaml")["applications"][0]["args"]
    model = next(m for m in cluster["models"] if m["family"] == case.family)
    deployment = {key: value for key, value in model["deployment"].items()
                  if key not in ("num_gpus", "num_cpus", "autoscaling_config")}
    deployment.update(num_replicas=replicas, num_cpus=0.01, max_queued_requests=-1)
    limits = {**model["limits"], "sizes": [case.size], "min_side": 64, "min_pixels": None}
    model = {key: value for key, value in model.items()
             if key not in ("preview_decoder", "vae", "variant", "loras", "fused_loras")}
    model.update(source=f"sim:{case.family}", deployment=deployment, limits=limits,
                 defaults={**model["defaults"], "size": case.size, "num_inference_steps": case.steps})
    tiny = load_serve_config(ROOT / "configs" / "tiny.yaml")["applications"][0]["args"]
    ingress = {**tiny["ingress"], "request_timeout_s": 1800}
    return {**tiny, "models": [model], "chains": [], "default_model": model["name"],
            "default_upscaler": None, "safety": None, "ingress": ingress}


def capacity(case: Case, args: dict, replicas: int) -> float:
    max_images = args["models"][0]["batching"]["max_batch_images"]
    return COSTS[case.family].best_rate(case.steps, case.pixels, max_images) * replicas


async def closed_loop(url: str, model: str, case: Case, concurrency: int, warmup_s: float,
                      window_s: float) -> dict:
    """``concurrency`` clients, each sending its next request when the last is answered.
    Requests answered inside the window after ``warmup_s`` count; latencies are of requests
    sent after the warm-up and answered inside the window."""
    import httpx

    payload = {"model": model, "prompt": PROMPT, "size": case.size, "n": 1}
    done: list[tuple[float, float]] = []  # (sent, answered)
    failures: list[str] = []
    start = time.perf_counter()
    stop = start + warmup_s + window_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        async def client_loop(index: int) -> None:
            seed = index * 100000
            sent_one = False
            # Each client sends one request at least: a short window (a warm-up of fast
            # models) can pass before the clients start on a busy machine.
            while not sent_one or time.perf_counter() < stop:
                sent_one = True
                sent = time.perf_counter()
                response = await client.post(f"{url}/v1/images/generations", json={**payload, "seed": seed})
                answered = time.perf_counter()
                seed += 1
                if response.status_code != 200 or b'"b64_json":"' not in response.content[:200]:
                    failures.append(f"{response.status_code} {response.text[:200]}")
                    continue
                done.append((sent, answered))

        await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    begin, end = start + warmup_s, stop
    answered = [a for _, a in done if begin <= a <= end]
    latencies = [a - s for s, a in done if s >= begin and a <= end] or [a - s for s, a in done]
    return {"images_per_s": len(answered) / window_s, "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99), "requests": len(done), "window_s": window_s,
            "latencies": len(latencies), "failures": failures[:3], "failed": len(failures)}


def replica_counters(name: str, replicas: int) -> dict[str, tuple[int, int]]:
    """(pipeline calls, images) of every replica, by replica id (stats answer from any
    replica: asked until each has answered)."""
    from ray import serve

    handle = serve.get_deployment_handle(name, app_name="images")
    seen: dict[str, tuple[int, int]] = {}
    for _ in range(40 * replicas):
        stats = handle.stats.remote().result(timeout_s=60)
        seen[stats["replica"]] = (stats["pipeline_calls"], stats["images"])
        if len(seen) == replicas:
            break
    return seen


def mean_batch(before: dict, after: dict) -> float:
    calls = sum(after[r][0] - before.get(r, (0, 0))[0] for r in after)
    images = sum(after[r][1] - before.get(r, (0, 0))[1] for r in after)
    return images / calls if calls else 0.0


def sim_floor_model(case: Case, model_s: float):
    """For :func:`serve_floor_app`: sleep the simulated model time, then the same
    photo-like image ``sim:`` returns."""
    width, height = map(int, case.size.split("x"))

    def make_model():
        from deployments.standins.sim import sim_images

        def call(seed: int):
            time.sleep(model_s)
            return sim_images(width, height, [seed])[0]

        return call

    return make_model


def side_by_side(url: str, model: str, case: Case, pairs: int) -> dict:
    """Concurrency 1, our app and the floor app alternated request by request (the VM's
    drift falls on both): p50 of each after two warm-up pairs."""
    import httpx

    payload = {"model": model, "prompt": PROMPT, "size": case.size, "n": 1}
    with httpx.Client(timeout=600) as client:
        def generate(path: str):
            def call(seed: int) -> None:
                response = client.post(f"{url}{path}/v1/images/generations", json={**payload, "seed": seed})
                if response.status_code != 200 or b'"b64_json":"' not in response.content[:200]:
                    raise RuntimeError(f"{path or '/'}: {response.status_code} {response.text[:200]}")
            return call

        times = alternate({"ours": generate(""), "floor": generate("/floor")}, pairs, warmup=2)
    return {"ours_p50_s": percentile(times["ours"], 50), "floor_p50_s": percentile(times["floor"], 50),
            "pairs": pairs}


def run_case(url: str, case: Case, replicas: int, concurrencies: tuple[int, ...], smoke: bool) -> dict:
    from ray import serve

    from serve_app.app import build_app

    args = sim_args(case, replicas)
    serve.run(build_app(args), name="images", route_prefix="/")
    name = args["models"][0]["name"]
    cap = capacity(case, args, replicas)
    model_s = COSTS[case.family].call_s(1, case.pixels, case.steps)
    asyncio.run(closed_loop(url, name, case, min(replicas * 8, 64), 0, 2 * model_s))  # warm every replica
    rows = {}
    for concurrency in concurrencies:
        # Steady state: warm up for about one latency, then measure two.
        latency = max(model_s, concurrency / cap)
        warmup, window = (0.5, 3.0) if smoke else (1.2 * latency, max(2.5 * latency, 20.0))
        before = replica_counters(name, replicas)
        row = asyncio.run(closed_loop(url, name, case, concurrency, warmup, window))
        row["mean_batch"] = mean_batch(before, replica_counters(name, replicas))
        row["capacity"] = cap
        row["of_capacity"] = row["images_per_s"] / cap
        row["model_s"] = model_s
        rows[concurrency] = row
        print(f"{case.label}, {replicas} replicas, c={concurrency}: "
              f"{ {k: v for k, v in row.items() if k != 'failures'} }", flush=True)
    if 1 in rows and replicas == 1:
        serve.run(serve_floor_app(sim_floor_model(case, model_s)), name="floor", route_prefix="/floor")
        pairs = 4 if smoke else max(12, round(60 / model_s))
        rows[1]["floor"] = side_by_side(url, name, case, pairs)
        serve.delete("floor")
        print(f"{case.label}, side by side with the floor: {rows[1]['floor']}", flush=True)
    return rows


def path_costs(cases: list[Case]) -> list[str]:
    """CPU cost of the served path's steps for one image, in this process (best of 5)."""
    import numpy as np
    from PIL import Image

    from deployments.standins.sim import sim_images
    from serve_app.service.encoding import encode_image

    def best(call, repeat=5) -> float:
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
        return min(times) * 1000

    lines = ["| image | fpng | zlib level 1 | zlib level 6 | base64 | JSON body | PNG size (fpng / zlib 6) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for case in cases:
        width, height = map(int, case.size.split("x"))
        pixels = np.ascontiguousarray(sim_images(width, height, [0])[0])
        fast = encode_image(pixels, "png")
        small = encode_image(pixels, "png", png_level=6, png_encoder="zlib")
        b64 = base64.b64encode(fast).decode("ascii")
        body = {"created": 0, "data": [{"b64_json": b64, "seed": 1}], "output_format": "png"}
        lines.append(
            f"| {case.size} | {best(lambda: encode_image(pixels, 'png')):.1f} ms "
            f"| {best(lambda: Image.fromarray(pixels).save(io.BytesIO(), 'PNG', compress_level=1)):.1f} ms "
            f"| {best(lambda: encode_image(pixels, 'png', png_level=6, png_encoder='zlib'), 2):.1f} ms "
            f"| {best(lambda: base64.b64encode(fast)):.1f} ms | {best(lambda: json.dumps(body)):.1f} ms "
            f"| {len(fast) / 1e6:.2f} / {len(small) / 1e6:.2f} MB |")
    return lines


def write_report(results: dict, cases: list[Case], smoke: bool, out: Path, command: str,
                 path_lines: list[str]) -> Path:
    lines = [
        "Simulated H100s (`sim:<family>`, deployments/standins/sim.py: a cost model fitted to published "
        "H100 figures; benchmarks only), served by the real app on this machine's "
        f"{os.cpu_count()} CPU cores. Command: `{command}`.",
        "",
        "| model | replicas | concurrency | images/s | capacity | of capacity | mean batch "
        "| p50 | p99 | requests (failed) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (label, replicas), rows in results.items():
        for concurrency, row in rows.items():
            lines.append(
                f"| {label} | {replicas} | {concurrency} | {row['images_per_s']:.2f} "
                f"| {row['capacity']:.2f} | {row['of_capacity']:.2f} | {row['mean_batch']:.1f} "
                f"| {row['p50_s'] * 1000:.0f} ms | {row['p99_s'] * 1000:.0f} ms "
                f"| {row['requests']} ({row['failed']}) |")
    lines += ["", "At concurrency 1, what the serving layer adds to the simulated model time:", "",
              "| model | replicas | model time | served p50 | overhead |", "| --- | --- | --- | --- | --- |"]
    for (label, replicas), rows in results.items():
        if 1 in rows:
            row = rows[1]
            lines.append(f"| {label} | {replicas} | {row['model_s'] * 1000:.0f} ms | {row['p50_s'] * 1000:.0f} ms "
                         f"| {(row['p50_s'] - row['model_s']) * 1000:+.0f} ms |")
    floors = [(label, rows[1]) for (label, _), rows in results.items() if "floor" in rows.get(1, {})]
    if floors:
        lines += ["", "At concurrency 1, one replica, side by side: this app and Ray Serve's own floor "
                  "for the same bytes (`benchmarks/common.py: serve_floor_app`: a FastAPI route calling "
                  "a deployment that sleeps the model time and returns the same image, fpng, base64, "
                  "a JSON body built by hand), requests alternated:", "",
                  "| model | model time | pairs | this app p50 | floor p50 | this app's overhead "
                  "| floor's overhead | this app above the floor |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for label, row in floors:
            side, model_ms = row["floor"], row["model_s"] * 1000
            ours_ms, floor_ms = side["ours_p50_s"] * 1000, side["floor_p50_s"] * 1000
            lines.append(f"| {label} | {model_ms:.0f} ms | {side['pairs']} | {ours_ms:.0f} ms "
                         f"| {floor_ms:.0f} ms | {ours_ms - model_ms:+.0f} ms | {floor_ms - model_ms:+.0f} ms "
                         f"| {ours_ms - floor_ms:+.0f} ms |")
    lines += ["", "CPU cost of the path's steps for one image (this process, best of 5):", "", *path_lines]
    if smoke:
        lines += ["", "smoke run: a small model and short runs, to keep the script working; "
                  "not figures to quote."]
    return write_lines(out, "sim-h100-smoke.md" if smoke else "sim-h100.md", lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="a small model and short runs (tests)")
    opts = parser.parse_args()
    cases = SMOKE_CASES if opts.smoke else CASES
    replica_counts = (1, 2) if opts.smoke else (1, 8)
    concurrencies = (1, 4) if opts.smoke else (1, 16, 64)
    command = "python3 -m benchmarks.sim" + (f" --smoke --out {opts.out}" if opts.smoke else "")
    results = {}
    first = sim_args(cases[0], 1)
    with run_local(ROOT / "configs" / "tiny.yaml", args_override=first) as url:
        for case in cases:
            for replicas in replica_counts:
                results[(case.label, replicas)] = run_case(url, case, replicas, concurrencies, opts.smoke)
    report = write_report(results, cases, opts.smoke, opts.out, command, path_costs(cases))
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
