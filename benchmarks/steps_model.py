"""How much any order of the same work could gain: a virtual-time model of one replica
under the simulated H100's cost model, request-level against step-level batching.

    python3 -m benchmarks.steps_model [--out benchmarks/results] [--jobs 20000] [--smoke]

benchmarks/steps.py measures the deployments themselves (their threads, batcher and step
loop) on a sleeping accelerator, so a run holds hundreds of jobs and its p99 is a handful of
them. This is a model, not a measurement: no threads and no clock, one replica, the same cost
model (deployments/standins/sim.py: per UNet call by rows and size, per text encode, per
decode), 20000 Poisson arrivals a load with steps from {20, 30, 40} and guidance from {5, 7}.
It answers one question: could another order of the step loop's calls reach step mode's goal
(end-to-end p99 at 80 % load at most 0.6x request level's)? Orders:

- ``request``: the request batcher: at each free moment, the oldest queued job's batch key
  (steps, guidance) runs to its end with up to ``max_batch_images`` queued jobs of that key.
- ``step``: the step loop as built (deployments/runtime/steploop.py): new jobs' first step a call of
  their own, then the oldest first, up to ``max_batch_images`` images a call; finished jobs
  decode before the next call unless a new job waits; its default images in flight
  (deployments/contract.py: 16x a call's).
- ``step, 4x in flight`` and ``step, unbounded``: the same with 4x a call's images in flight
  (the previous default), and with no limit.
- ``oldest first``: every call the oldest jobs, new ones wait their turn (FIFO, full calls).
- ``fewest steps left``: every call the jobs nearest their end (shortest remaining first).

Writes ``steps-model.md`` (``steps-model-smoke.md`` with ``--smoke``: 500 jobs). Benchmarks
measure; nothing here asserts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


from benchmarks.common import percentile, write_lines
from benchmarks.steps import LOADS, Arrival, Workload, arrivals, cluster_batch
from deployments.contract import IN_FLIGHT_PER_BATCH
from deployments.standins.sim import COSTS

ROOT = Path(__file__).resolve().parent.parent


def trace(rate: float, jobs: int, seed: int) -> list[Arrival]:
    """The first ``jobs`` of steps.py's arrivals (a span they all but surely fill)."""
    out = arrivals(rate, 2 * jobs / rate, seed)[:jobs]
    assert len(out) == jobs, "the span held fewer arrivals than asked for"
    return out


def request_level(jobs, workload: Workload) -> tuple[list[float], list[float]]:
    """End-to-end and first-step seconds of each job under the request batcher."""
    cost, batch = COSTS[workload.family], workload.max_batch_images
    now, queue, done, first, nxt = 0.0, [], [], [], 0
    while nxt < len(jobs) or queue:
        if not queue:
            now = max(now, jobs[nxt].at)
        while nxt < len(jobs) and jobs[nxt].at <= now:
            queue.append(jobs[nxt])
            nxt += 1
        key = (queue[0].steps, queue[0].guidance)
        chosen = [job for job in queue if (job.steps, job.guidance) == key][:batch]
        for job in chosen:
            queue.remove(job)
        step = cost.step_s(len(chosen), workload.pixels)
        started = now + cost.text_ms / 1000
        now = started + key[0] * step + cost.decode_s(len(chosen), workload.pixels)
        done += [now - job.at for job in chosen]
        first += [started + step - job.at for job in chosen]
    return done, first


def step_level(jobs, workload: Workload, order: str, in_flight: float
               ) -> tuple[list[float], list[float], list[float]]:
    """The same under a step loop that picks each call's jobs by ``order``, and the seconds
    to each job's second step (a job that starts at once may then wait its turn)."""
    cost, batch, pixels = COSTS[workload.family], workload.max_batch_images, workload.pixels
    now, queue, flight, finished, done, first, second, nxt = 0.0, [], [], [], [], [], [], 0
    while nxt < len(jobs) or queue or flight or finished:
        if not (queue or flight or finished):
            now = max(now, jobs[nxt].at)
        while nxt < len(jobs) and jobs[nxt].at <= now:
            queue.append(jobs[nxt])
            nxt += 1
        while queue and len(flight) + len(finished) < in_flight:  # admitted: its text encoders run
            job = queue.pop(0)
            now += cost.text_ms / 1000
            flight.append({"arrived": job.at, "left": job.steps, "calls": 0})
        new = [job for job in flight if job["calls"] == 0]
        if finished and not (order == "step" and new):
            now += cost.decode_s(len(finished[:batch]), pixels)
            done += [now - job["arrived"] for job in finished[:batch]]
            del finished[:batch]
            continue
        if order == "step":
            chosen = new[:batch] or sorted(flight, key=lambda job: job["arrived"])[:batch]
        elif order == "oldest first":
            chosen = sorted(flight, key=lambda job: job["arrived"])[:batch]
        else:  # fewest steps left
            chosen = sorted(flight, key=lambda job: (job["left"], job["arrived"]))[:batch]
        now += cost.step_s(len(chosen), pixels)
        for job in chosen:
            job["calls"] += 1
            job["left"] -= 1
            if job["calls"] <= 2:
                (first if job["calls"] == 1 else second).append(now - job["arrived"])
            if job["left"] == 0:
                flight.remove(job)
                finished.append(job)
    return done, first, second


# (column, order, images in flight per image of a call)
ORDERS = (("step", "step", IN_FLIGHT_PER_BATCH), ("step, 4x in flight", "step", 4),
          ("step, unbounded", "step", float("inf")),
          ("oldest first", "oldest first", IN_FLIGHT_PER_BATCH),
          ("fewest steps left", "fewest steps left", IN_FLIGHT_PER_BATCH))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--jobs", type=int, default=20000, help="arrivals a load")
    parser.add_argument("--smoke", action="store_true", help="500 jobs, 80 %% only")
    args = parser.parse_args()
    jobs_per_run, loads = (500, (0.8,)) if args.smoke else (args.jobs, LOADS)
    started = time.perf_counter()
    lines = [f"# Any order of the same work: a virtual-time model{' (smoke)' if args.smoke else ''}",
             "", f"`python3 -m benchmarks.steps_model{' --smoke' if args.smoke else ''}`: one replica, "
             f"the simulated H100's cost model, {jobs_per_run} Poisson arrivals a load. A model of "
             "the orders, not a measurement of the deployments (benchmarks/steps.py is that).",
             "Each cell: end-to-end p99 against request level's on the same arrivals; in brackets "
             "the p99 of the time to the first step / to the second step, in steps of a full batch "
             "(request level: its first step; its second comes one step later).", "",
             "| model | load | request p99 s (first step) | " + " | ".join(name for name, _, _ in ORDERS) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in ORDERS) + " |"]
    for family, size in (("sdxl", 1024), ("sd21", 768)):
        workload = Workload(f"{family} {size}x{size}", family, size, cluster_batch(family))
        full_step = COSTS[family].step_s(workload.max_batch_images, workload.pixels)
        for load in loads:
            jobs = trace(load * workload.capacity(1), jobs_per_run, seed=int(load * 100))
            done, first = request_level(jobs, workload)
            reference = percentile(done, 99)
            cells = [f"{reference:.1f} ({percentile(first, 99) / full_step:.0f})"]
            for _, order, per_call in ORDERS:
                done, first, second = step_level(jobs, workload, order, per_call * workload.max_batch_images)
                cells.append(f"{percentile(done, 99) / reference:.2f}x ({percentile(first, 99) / full_step:.1f}"
                             f" / {percentile(second, 99) / full_step:.0f})")
            lines.append(f"| {workload.label} | {load:.0%} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    lines += ["", f"{time.perf_counter() - started:.0f} s in all."]
    print(write_lines(args.out, "steps-model-smoke.md" if args.smoke else "steps-model.md", lines))


if __name__ == "__main__":
    main()
