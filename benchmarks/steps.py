"""Request-level against step-level batching, side by side, on simulated H100s.

    python3 -m benchmarks.steps [--out benchmarks/results] [--seconds 240] [--speed 4] [--smoke]

Open-loop Poisson arrivals at 50 %, 80 % and 95 % of the request-level capacity, for SDXL
1024x1024 and SD 2.1 768x768, each job's steps drawn from {20, 30, 40} and its guidance from
{5, 7}, on 1 and 8 simulated GPUs. The same arrivals go, at the same moments, to two fleets
of replicas that differ only in ``batching.mode`` (``request`` and ``step``): the model
deployments themselves (their batchers, step loop, cancellation and step callbacks) around
the simulated accelerator (``sim:<family>``, deployments/standins/sim.py: sleeps for the
cost model's H100 time per UNet call by rows and size, per text encode and per decode),
its clock run ``--speed`` times faster than the H100's so that a run holds hundreds of jobs
(a p99 of forty is their maximum); every time reported is the H100's (measured, times the
speed). The max images a replica batches (in step mode: takes into one UNet call) come from
configs/cluster.yaml; step mode keeps its default images in flight (steploop.py). A job goes to the fleet's less loaded of two replicas drawn at random
(Ray Serve's power of two choices), called in-process: the figures are the replicas'
scheduling, not HTTP.

Per fleet: images/s (and over the request-level capacity), mean UNet rows per call (a guided
image is two rows), time from arrival to the end of the first denoising step (p50, p99),
end-to-end latency (p50, p99). Then step mode's goals as ratios of the two fleets; the
first-step p99 in step times two ways: steps of one guided image, and the step-mode fleet's
full UNet call (a step of a batch of the most images a call takes, measured: the step a new
job finds in progress at a busy replica). Then the
tiny SD 2.1 on this machine's CPU (one torch thread), request against step, one after the
other on the same arrivals.

Request-level capacity: the cost model's images/s when every call is a full batch of one
step count, averaged over the step mix (``CostModel.best_rate``) times the GPUs.

Writes ``steps-sim.md`` to ``--out`` (``steps-sim-smoke.md`` with ``--smoke``: one GPU, one
load, a few seconds; for tests). Benchmarks measure; nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import machine, percentile, quiet, write_lines  # noqa: E402
from deployments.contract import PipelineSpec, TextToImageJob  # noqa: E402
from deployments.families import FAMILIES  # noqa: E402
from deployments.standins.sim import COSTS, photo_like  # noqa: E402
from serve_app.tools.launch import load_serve_config  # noqa: E402

STEPS = (20, 30, 40)
GUIDANCE = (5.0, 7.0)
LOADS = (0.5, 0.8, 0.95)
MODES = ("request", "step")


@dataclass(frozen=True)
class Workload:
    label: str
    family: str
    size: int  # square side
    max_batch_images: int

    @property
    def pixels(self) -> int:
        return self.size * self.size

    def capacity(self, gpus: int) -> float:
        """Request-level images/s: full batches of one step count, over the step mix."""
        cost = COSTS[self.family]
        per_image = sum(1 / cost.best_rate(steps, self.pixels, self.max_batch_images) for steps in STEPS)
        return gpus * len(STEPS) / per_image

    def step_s(self) -> float:
        """One UNet step of one guided image: the unit of the admission goal."""
        return COSTS[self.family].unet_s(2, self.pixels)


def cluster_batch(family: str) -> int:
    config = load_serve_config(ROOT / "configs" / "cluster.yaml")["applications"][0]["args"]
    model = next(m for m in config["models"] if m["family"] == family)
    return model["batching"]["max_batch_images"]


@dataclass
class Arrival:
    at: float
    steps: int
    guidance: float
    seed: int


def arrivals(rate: float, seconds: float, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    out, now = [], 0.0
    while True:
        now += rng.expovariate(rate)
        if now >= seconds:
            return out
        out.append(Arrival(now, rng.choice(STEPS), rng.choice(GUIDANCE), len(out)))


@dataclass
class Fleet:
    mode: str
    replicas: list
    speed: float = 1.0  # the simulated clock's (1: the tiny model's real one)
    ongoing: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    done_at: list[float] = field(default_factory=list)
    failed: int = 0

    def __post_init__(self):
        self.ongoing = [0] * len(self.replicas)
        for replica in self.replicas:
            device = getattr(replica.pipe, "device", None)
            if hasattr(device, "speed"):
                device.speed = self.speed

    def pick(self, rng: random.Random) -> int:
        if len(self.replicas) == 1:
            return 0
        a, b = rng.sample(range(len(self.replicas)), 2)
        return a if self.ongoing[a] <= self.ongoing[b] else b

    async def call(self, index: int, job: TextToImageJob, started: float) -> None:
        self.ongoing[index] += 1
        try:
            await self.replicas[index].text_to_image(job)
            now = time.perf_counter()
            self.latencies.append((now - started) * self.speed)
            self.done_at.append(now)
        except Exception:  # noqa: BLE001 - counted; a benchmark reports, never stops
            self.failed += 1
        finally:
            self.ongoing[index] -= 1

    def report(self, start: float, capacity: float) -> dict:
        stats = [replica.batcher.stats for replica in self.replicas]
        waits = [wait * self.speed for s in stats for wait in s.first_step_waits]
        call_s = float("nan")
        if self.mode == "step":
            rows = [count for replica in self.replicas for count in replica.steps.stats.rows]
            # A step of a full batch: the mean of the calls that took a call's most rows.
            full = [seconds for replica in self.replicas
                    for rows_, seconds in zip(replica.steps.stats.rows, replica.steps.stats.seconds)
                    if rows_ == replica.steps.max_rows]
            call_s = self.speed * sum(full) / len(full) if full else float("nan")
        else:  # every job here is guided: two rows an image, one pipeline call a batch
            rows = [2 * images for s in stats for images in s.batch_sizes]
        elapsed = (max(self.done_at) - start) * self.speed if self.done_at else float("nan")
        throughput = len(self.latencies) / elapsed
        return {"mode": self.mode, "jobs": len(self.latencies), "failed": self.failed,
                "throughput": throughput, "of_capacity": throughput / capacity,
                "rows": sum(rows) / len(rows) if rows else float("nan"), "full_call_s": call_s,
                "first_p50": percentile(waits, 50), "first_p99": percentile(waits, 99),
                "p50": percentile(self.latencies, 50), "p99": percentile(self.latencies, 99)}


def make_fleet(workload: Workload, mode: str, gpus: int, source: str = "sim", threads: int = 1,
               speed: float = 1.0) -> Fleet:
    cls = FAMILIES[workload.family].deployment_class()
    replicas = [cls(PipelineSpec(name=f"{workload.label}-{mode}-{i}", family=workload.family,
                                 source=f"{source}:{workload.family}", batching_mode=mode,
                                 max_batch_images=workload.max_batch_images, cpu_threads=threads,
                                 dtype="float32"))
                for i in range(gpus)]
    return Fleet(mode, replicas, speed)


async def drive(fleets: list[Fleet], trace: list[Arrival], workload: Workload, speed: float = 1.0) -> float:
    """Send ``trace`` to every fleet at the same moments (its times are the H100's: divided
    by ``speed`` on this clock); returns the start time."""
    rng = random.Random(7)
    tasks = []
    start = time.perf_counter()
    for arrival in trace:
        delay = start + arrival.at / speed - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        job = TextToImageJob(prompt="a lighthouse", negative_prompt=None, width=workload.size,
                             height=workload.size, num_inference_steps=arrival.steps,
                             guidance_scale=arrival.guidance, seeds=(arrival.seed,))
        now = time.perf_counter()
        for fleet in fleets:
            tasks.append(asyncio.ensure_future(fleet.call(fleet.pick(rng), job, now)))
    await asyncio.gather(*tasks)
    return start


def row(workload: Workload, gpus: int, load: float, result: dict, in_steps: bool = True) -> str:
    first = f"{result['first_p50']:.2f} / {result['first_p99']:.2f}"
    if in_steps:
        first += f" ({result['first_p99'] / workload.step_s():.1f} steps)"
    return (f"| {workload.label} | {gpus} | {load:.0%} | {result['mode']} | {result['jobs']} | "
            f"{result['throughput']:.3f} ({result['of_capacity']:.0%}) | {result['rows']:.2f} | "
            f"{first} | {result['p50']:.2f} / {result['p99']:.2f} |")


def goals(results: dict) -> list[str]:
    """Step mode's goals as ratios of the two fleets on the same arrivals."""
    lines = ["", "Goals (step against request, the same arrivals):", "",
             "| model | GPUs | at 80 %: p99 step / request (goal <= 0.6) | at 80 %: first-step p99 in steps "
             "of one guided image / of a full batch (goal < 2) "
             "| at 95 %: throughput step / request (goal >= 1) |",
             "| --- | --- | --- | --- | --- |"]
    for (label, gpus), by_load in results.items():
        workload = by_load["workload"]
        at80, at95 = by_load.get(0.8), by_load.get(0.95)
        p99 = f"{at80['step']['p99'] / at80['request']['p99']:.2f}" if at80 else "-"
        first = (f"{at80['step']['first_p99'] / workload.step_s():.1f} / "
                 f"{at80['step']['first_p99'] / at80['step']['full_call_s']:.1f}") if at80 else "-"
        rate = f"{at95['step']['throughput'] / at95['request']['throughput']:.2f}" if at95 else "-"
        lines.append(f"| {label} | {gpus} | {p99} | {first} | {rate} |")
    return lines


HEADER = ["| model | GPUs | load | mode | jobs | images/s (of capacity) | rows / UNet call | "
          "first step p50 / p99 s | end-to-end p50 / p99 s |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]


def tiny_cpu(seconds: float, lines: list[str]) -> None:
    """The tiny SD 2.1 on this CPU, one torch thread: request, then step, same arrivals."""
    import torch

    torch.set_num_threads(1)
    workload = Workload("tiny SD 2.1 128x128", "sd21", 128, 8)
    # Its capacity on this machine: one full batch of each step count, timed.
    probe = make_fleet(workload, "request", 1, source="tiny").replicas[0]
    started = time.perf_counter()
    for steps in STEPS:
        asyncio.run(probe.text_to_image(TextToImageJob(
            prompt="p", negative_prompt=None, width=128, height=128, num_inference_steps=steps,
            guidance_scale=7.0, seeds=tuple(range(8)))))
    capacity = 8 * len(STEPS) / (time.perf_counter() - started)
    trace = arrivals(0.8 * capacity, seconds, seed=3)
    lines += ["", f"Tiny SD 2.1 on this CPU (one torch thread), 80 % of its measured capacity "
              f"({capacity:.2f} images/s: full batches of 8), {len(trace)} jobs in {seconds:.0f} s, "
              "request then step on the same arrivals:", "", *HEADER]
    for mode in MODES:
        fleet = make_fleet(workload, mode, 1, source="tiny")
        start = asyncio.run(drive([fleet], trace, workload))
        lines.append(row(workload, 1, 0.8, fleet.report(start, capacity), in_steps=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--seconds", type=float, default=240.0,
                        help="arrivals per run, in the H100's seconds (1 GPU: twice)")
    parser.add_argument("--speed", type=float, default=4.0,
                        help="the simulated clock runs this many times faster than an H100")
    parser.add_argument("--smoke", action="store_true", help="one GPU, one load, a few seconds")
    args = parser.parse_args()
    quiet()
    workloads = [Workload("SDXL 1024x1024", "sdxl", 1024, cluster_batch("sdxl")),
                 Workload("SD 2.1 768x768", "sd21", 768, cluster_batch("sd21"))]
    gpu_counts, loads, seconds = (1, 8), LOADS, args.seconds
    if args.smoke:
        workloads, gpu_counts, loads, seconds = workloads[1:], (1,), (0.8,), 24.0
    for workload in workloads:
        photo_like(workload.size, workload.size)  # made once, before any clock runs
    started = time.perf_counter()
    lines = [f"# Request-level against step-level batching on simulated H100s{' (smoke)' if args.smoke else ''}",
             "", f"`python3 -m benchmarks.steps{' --smoke' if args.smoke else ''}` on {machine('cpu')}.",
             "Steps from {20, 30, 40}, guidance from {5, 7}; Poisson arrivals; both fleets get the same "
             "arrivals at the same moments. First step: arrival to the end of the job's first denoising "
             "step, also in steps of one guided image.",
             f"The simulated clock ran {args.speed:g} times an H100's; every time here is the H100's.",
             "", *HEADER]
    results: dict = {}
    for workload in workloads:
        for gpus in gpu_counts:
            capacity = workload.capacity(gpus)
            by_load: dict = {"workload": workload}
            for load in loads:
                run_seconds = seconds * (2 if gpus == 1 and not args.smoke else 1)
                trace = arrivals(load * capacity, run_seconds, seed=int(load * 100) + gpus)
                fleets = [make_fleet(workload, mode, gpus, speed=args.speed) for mode in MODES]
                start = asyncio.run(drive(fleets, trace, workload, args.speed))
                by_load[load] = {fleet.mode: fleet.report(start, capacity) for fleet in fleets}
                for fleet in fleets:
                    lines.append(row(workload, gpus, load, by_load[load][fleet.mode]))
                print(lines[-2], lines[-1], sep="\n", flush=True)
            results[(workload.label, gpus)] = by_load
    lines += goals(results)
    if not args.smoke:
        tiny_cpu(seconds / (2 * args.speed), lines)  # its own clock: 30 s by default
    lines += ["", f"{time.perf_counter() - started:.0f} s in all."]
    name = "steps-sim-smoke.md" if args.smoke else "steps-sim.md"
    print(write_lines(args.out, name, lines))


if __name__ == "__main__":
    main()
