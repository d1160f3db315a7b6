"""LoRA adapters per request: what switching adapters between batches costs, and jobs of
different adapters run in separate calls (grouped) against one call (mixed), side by side.

    python3 -m benchmarks.loras [--threads 1] [--batches 20] [--rounds 20] [--smoke] [--out benchmarks/results]
    python3 -m benchmarks.loras --sim [--rounds 3] [--smoke] [--out benchmarks/results]

Runs the deployments in this process, called directly as the unit tests call them (no Ray,
no HTTP). A replica's UNet holds ``lora_slots`` adapter slots (deployments/runtime/
lora_slots.py): serving an adapter copies its weights into a slot; rows of one call run each
its own adapters at its own weights, so jobs of up to ``lora_slots`` distinct adapters share
a call. A replica with one slot runs jobs of different adapters in separate calls: the
grouping every server did before mixed batches.

Without ``--sim``: the tiny SD 2.1 deployment (``tiny:sd21``), on CUDA when there is one and
on CPU otherwise (same code), with the seeded tiny LoRAs ``tiny:lora/sd21/ink`` (A) and
``tiny:lora/sd21/pastel`` (B).

1. Switching cost between batches: ``--batches`` batches of 4 images (one job of 4 seeds:
   one pipeline call) at 256x256, 4 steps, each scenario on a replica of its own:
   (a) no adapters (a replica that never loaded one);
   (b) every batch with A (copied into a slot once);
   (c) batches alternating A and B, two slots: both stay in their slots, a batch turns
       the other slot on;
   (s) batches alternating A and B, one slot (``max_loaded_loras=2``): every batch copies
       the other adapter's weights into the slot in place;
   (d) batches alternating A and B, ``max_loaded_loras=1``: every batch evicts one adapter,
       reads the other from disk and copies it into a slot;
   (a') (a) again on another replica: the noise floor between identical replicas.
   All interleaved batch by batch, so that a machine whose speed drifts hits them alike.
   Seconds per batch (median, p90), the ratio to (a), the time in ``LoraCache.acquire``
   (load, evict, copy into slots) per batch, loads and slot copies.
2. Grouped vs mixed: ``--rounds`` rounds of 8 concurrent requests of one image each, in
   request mode and in step mode (a replica each): half with A and half with B, and
   3 A + 3 B + 2 without adapters, on a replica with one slot (grouped: two calls) and on
   one with two slots (mixed: one call); all A and none on the mixed replica as
   references. The runs of a mode interleave round by round; each checks its calls
   (request mode: pipeline calls' images; step mode: the most rows in one UNet call).

With ``--sim``: part 2 on the simulated H100 (``sim:<family>``, deployments/standins/sim.py:
the real deployments and LoRA slots around a pipeline that sleeps for a cost model's time,
LoRA rows charged by their FLOPs) at SD 2.1 512x512 25 steps and SDXL 1024x1024 30 steps,
with adapters ``sim:lora/<family>/r<rank>-a`` / ``-b`` of rank 16 and 64 (the slots take the
configured adapters' rank). Figures are the simulated accelerator's seconds per round (what
the cost model charged: the device's busy time), not this machine's.

Writes ``loras-cpu.md`` (``loras-<gpu name>.md`` on CUDA; ``loras-sim-h100.md`` with
``--sim``; ``-smoke`` added with ``--smoke``) to ``--out`` and prints it. ``--smoke`` runs 2
batches and 2 rounds at 64x64 and 1 step (with ``--sim``: 1 round of SD 2.1 at rank 16, 2
steps): a check that the script works, not a measurement. Benchmarks measure; the only
checks here make sure each scenario ran as described (its calls, loads and copies).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import common

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from deployments.contract import LoraRef, PipelineSpec, TextToImageJob  # noqa: E402
from deployments.sources import Source  # noqa: E402

PROMPT = "a lighthouse at dusk"
BATCH_IMAGES = 4  # images per batch in part 1
CONCURRENT = 8  # requests of one image each in part 2
ADAPTER_A = LoraRef("ink", Source.parse("tiny:lora/sd21/ink"), None, 1.0)
ADAPTER_B = LoraRef("pastel", Source.parse("tiny:lora/sd21/pastel"), None, 1.0)


def job(loras: tuple[LoraRef, ...], seeds: tuple[int, ...], size: int, steps: int) -> TextToImageJob:
    return TextToImageJob(prompt=PROMPT, negative_prompt=None, width=size, height=size,
                          num_inference_steps=steps, guidance_scale=7.5, seeds=seeds, loras=loras)


@dataclass
class Replica:
    """A deployment built as a replica builds it, with the time its LoraCache spends in
    ``acquire`` (loading, evicting, copying into slots before each pipeline call) recorded
    per call."""

    label: str
    dep: object
    adapter_s: list[float] = field(default_factory=list)

    @classmethod
    def build(cls, label: str, threads: int, max_loaded_loras: int = 8, lora_slots: int = 3,
              mode: str = "request", source: str = "tiny:sd21", loras: tuple = ()) -> "Replica":
        from deployments.pipelines.sdxl import SDXLBaseDeployment
        from deployments.pipelines.stable_diffusion import StableDiffusionDeployment

        family = Source.parse(source).family
        spec = PipelineSpec(name=label, family=family, source=source, max_batch_images=8,
                            cpu_threads=threads, max_loaded_loras=max_loaded_loras,
                            lora_slots=lora_slots, batching_mode=mode, loras=loras)
        deployment = SDXLBaseDeployment if family == "sdxl" else StableDiffusionDeployment
        replica = cls(label, deployment(spec))
        cache = replica.dep.loras
        acquire = cache.acquire
        cuda = replica.dep.device == "cuda"

        def timed_acquire(groups):
            start = time.perf_counter()
            lease = acquire(groups)
            if cuda:
                torch.cuda.synchronize()
            replica.adapter_s.append(time.perf_counter() - start)
            return lease

        cache.acquire = timed_acquire  # this instance only; runs on the replica's pipeline thread
        return replica

    @property
    def swaps(self) -> int:
        """Adapters copied into a slot so far."""
        slots = self.dep.loras.slots
        return slots.swaps if slots is not None else 0

    def calls(self) -> tuple[int, int]:
        """(pipeline calls, UNet calls) so far (UNet calls: step mode only)."""
        steps = self.dep.steps
        return self.dep.batcher.stats.pipeline_calls, steps.stats.unet_calls if steps is not None else 0

    def run(self, jobs: list[TextToImageJob]) -> float:
        """Submit ``jobs`` concurrently (as concurrent requests reach a replica) and wait for
        all; returns the wall time."""
        async def together():
            return await asyncio.gather(*(self.dep.text_to_image(j) for j in jobs))

        start = time.perf_counter()
        asyncio.run(together())
        return time.perf_counter() - start


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "p90_s": common.percentile(times, 90)}


def alternating(i: int) -> tuple[LoraRef, ...]:
    return ((ADAPTER_A,), (ADAPTER_B,))[i % 2]


# Part 1: label, max_loaded_loras, lora_slots, the adapters of batch i.
SCENARIOS = {
    "a": ("(a) no adapters", 8, 3, lambda i: ()),
    "b": ("(b) same adapter every batch (A, in its slot)", 8, 3, lambda i: (ADAPTER_A,)),
    "c": ("(c) alternating A / B, two slots: each stays in its slot", 8, 2, alternating),
    "s": ("(s) alternating A / B, one slot: copied into the slot", 2, 1, alternating),
    "d": ("(d) alternating A / B, max_loaded_loras=1: evict, read, copy", 1, 3, alternating),
    # The same as (a) on a replica of its own: how far two identical replicas differ in one
    # run, the noise floor for the differences between the others.
    "a2": ("(a') no adapters, a second replica (A/A control)", 8, 3, lambda i: ()),
}


def bench_switching(replicas: dict[str, Replica], batches: int, size: int, steps: int) -> dict[str, dict]:
    seeds = tuple(range(BATCH_IMAGES))
    # Warm-up, not counted: the first pipeline call, and the adapters loaded; (c), (s) and
    # (d) end it on B, so that their first timed batch (A) switches, copies or reloads too.
    warm_up = {"a": (0,), "a2": (0,), "b": (0,), "c": (0, 1), "s": (0, 1), "d": (1,)}
    for key, (_, _, _, loras) in SCENARIOS.items():
        for i in warm_up[key]:
            replicas[key].run([job(loras(i), seeds, size, steps)])
    before = {key: (len(r.dep.loras.loads), len(r.dep.loras.evictions), len(r.adapter_s), r.swaps)
              for key, r in replicas.items()}
    times: dict[str, list[float]] = {key: [] for key in SCENARIOS}
    keys = list(SCENARIOS)
    for i in range(batches):
        # Interleaved, in a rotating order: drift and the neighbour's cache effects hit all.
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            loras = SCENARIOS[key][3](i)
            batch_seeds = tuple(range(i * BATCH_IMAGES, (i + 1) * BATCH_IMAGES))
            times[key].append(replicas[key].run([job(loras, batch_seeds, size, steps)]))
    results = {}
    for key, (label, capacity, slots, _) in SCENARIOS.items():
        replica = replicas[key]
        loads0, evictions0, adapter0, swaps0 = before[key]
        results[key] = {
            "label": label,
            "max_loaded_loras": capacity,
            "lora_slots": slots,
            **summary(times[key]),
            "adapter_median_s": statistics.median(replica.adapter_s[adapter0:]),
            "loads": len(replica.dep.loras.loads) - loads0,
            "evictions": len(replica.dep.loras.evictions) - evictions0,
            "copies": replica.swaps - swaps0,
        }
        row = results[key]
        print(f"{label}: median {row['median_s']:.3f} s, p90 {row['p90_s']:.3f} s, adapter work "
              f"{row['adapter_median_s'] * 1000:.2f} ms, {row['loads']} loads, {row['copies']} copies",
              flush=True)
    # Each scenario did what its label says.
    expected = {"a": (0, 0), "a2": (0, 0), "b": (0, 0), "c": (0, 0), "s": (0, batches),
                "d": (batches, batches)}
    for key, (loads, copies) in expected.items():
        got = (results[key]["loads"], results[key]["copies"])
        if got != (loads, copies):
            raise RuntimeError(f"scenario {key}: {got} (loads, slot copies), expected {(loads, copies)}")
    return results


# Part 2: the runs of one mode: (replica, the adapters of the 8 requests, label).
def grouped_runs(a: LoraRef, b: LoraRef) -> dict[str, tuple[str, list, str]]:
    half = [(a,), (b,)] * (CONCURRENT // 2)
    with_none = [(a,), (b,)] * 3 + [()] * 2
    return {
        "grouped": ("grouped", half, "4 A + 4 B, one slot: grouped"),
        "mixed": ("mixed", half, "4 A + 4 B, two slots: mixed"),
        "grouped_none": ("grouped", with_none, "3 A + 3 B + 2 none, one slot: grouped"),
        "mixed_none": ("mixed", with_none, "3 A + 3 B + 2 none, two slots: mixed"),
        "all_a": ("mixed", [(a,)] * CONCURRENT, "8 A (one adapter: reference)"),
        "plain": ("mixed", [()] * CONCURRENT, "8 without adapters (reference)"),
    }


def check_calls(name: str, mode: str, images: list[int], rows: list[int]) -> None:
    """Each run ran as its label says: grouped runs in two pipeline calls (step mode: no
    UNet call holds both adapters' rows, so at most 5 guided images), mixed runs in one
    (step mode: some UNet call holds all 8 guided images)."""
    grouped = name.startswith("grouped")
    if mode == "request":
        ok = len(images) == (2 if grouped else 1) and sum(images) == CONCURRENT
        got = f"pipeline calls of {images} images"
    else:
        ok = max(rows) <= 10 if grouped else max(rows) == 2 * CONCURRENT
        got = f"UNet calls of at most {max(rows)} rows"
    if not ok:
        raise RuntimeError(f"{mode} mode, {name}: {got}")


def bench_grouped(replicas: dict[str, Replica], runs: dict, mode: str, rounds: int, size: int,
                  steps: int, charged: bool = False) -> dict[str, dict]:
    """``rounds`` rounds of each run, interleaved round by round after a warm-up round;
    seconds per round: wall, or with ``charged`` what the simulated device charged."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    calls: dict[str, list[tuple[int, int]]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds + 1):  # round 0 warms up: loads, slot copies, first calls
        for name in names[r % len(names):] + names[:r % len(names)]:
            key, sets, _ = runs[name]
            replica = replicas[key]
            jobs = [job(loras, (1000 * r + k,), size, steps) for k, loras in enumerate(sets)]
            (pipeline0, unet0), charged0 = replica.calls(), replica.dep.pipe.charged_s if charged else 0
            seconds = replica.run(jobs)
            pipeline1, unet1 = replica.calls()
            stats = replica.dep.batcher.stats
            images = stats.batch_sizes[len(stats.batch_sizes) - (pipeline1 - pipeline0):]
            rows = replica.dep.steps.stats.rows[-(unet1 - unet0):] if unet1 > unet0 else []
            check_calls(name, mode, images, rows)
            if r:
                times[name].append(replica.dep.pipe.charged_s - charged0 if charged else seconds)
                calls[name].append((pipeline1 - pipeline0, unet1 - unet0))
    results = {}
    for name, (_, _, label) in runs.items():
        stats = summary(times[name])
        stats["images_per_s"] = CONCURRENT / stats["median_s"]
        stats["label"] = label
        stats["calls"] = statistics.median(c[1] if mode == "step" else c[0] for c in calls[name])
        results[name] = stats
        print(f"{mode} {label}: median {stats['median_s']:.3f} s per round, "
              f"{stats['images_per_s']:.2f} images/s", flush=True)
    return results


def quiet() -> None:
    """common.quiet, after Ray Serve has set its logger up (imported by the deployments)."""
    import deployments.pipelines.stable_diffusion  # noqa: F401 - sets Ray Serve's logger up

    common.quiet()


def report_name(device: str, smoke: bool) -> str:
    return f"loras-{device}" + ("-smoke" if smoke else "") + ".md"


def lora_size_kib() -> float:
    from deployments.sources import local_path

    folder = Path(local_path(ADAPTER_A.source))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1024


def grouped_table(results: dict, mode: str, unit: str) -> list[str]:
    """The table of one mode's part 2, and the ratios mixed / grouped."""
    what = "UNet calls/round" if mode == "step" else "pipeline calls/round"
    lines = [f"| {mode} mode | {what} | {unit}/round median | {unit}/round p90 | images/s |",
             "| --- | --- | --- | --- | --- |"]
    for row in results.values():
        lines.append(f"| {row['label']} | {row['calls']:g} | {row['median_s']:.3f} | {row['p90_s']:.3f} | "
                     f"{row['images_per_s']:.2f} |")
    ratio = results["mixed"]["images_per_s"] / results["grouped"]["images_per_s"]
    ratio_none = results["mixed_none"]["images_per_s"] / results["grouped_none"]["images_per_s"]
    lines += ["", f"- {mode} mode, mixed / grouped: **{ratio:.2f}x** images/s (4 A + 4 B), "
              f"**{ratio_none:.2f}x** (3 A + 3 B + 2 none)."]
    return lines


def ratios(results: dict) -> tuple[float, float]:
    return (results["mixed"]["images_per_s"] / results["grouped"]["images_per_s"],
            results["mixed_none"]["images_per_s"] / results["grouped_none"]["images_per_s"])


def write_report(switching: dict, grouped: dict, opts, device: str, dtype: str, command: str) -> Path:
    base = switching["a"]["median_s"]
    ms = lambda seconds: f"{seconds * 1000:.2f} ms"  # noqa: E731
    steps = f"{opts.steps} step{'' if opts.steps == 1 else 's'}"
    lines = [
        "# LoRA adapters: switching cost, grouped against mixed batches" + (" (smoke run, not a measurement)" if opts.smoke else ""),
        "",
        f"Tiny SD 2.1 (`tiny:sd21`) on {device} in {dtype}, torch threads {opts.threads}; "
        f"tiny rank-4 LoRAs `{ADAPTER_A.source}` (A) and `{ADAPTER_B.source}` (B), "
        f"{lora_size_kib():.0f} KiB each (UNet and text encoder attention projections), weight 1.0.",
        f"Machine: {common.machine(device, 'peft')}.",
        f"Command: `{command}`.",
        "",
        "## Switching cost between batches",
        "",
        f"{opts.batches} batches of {BATCH_IMAGES} images (one job of {BATCH_IMAGES} seeds: one "
        f"pipeline call) at {opts.size}x{opts.size}, {steps}, per scenario, one replica "
        "each, all interleaved batch by batch after a warm-up. \"Adapter work\" is the time "
        "in `LoraCache.acquire` before each pipeline call (load, evict, copy into a slot); "
        "it is part of the batch time.",
        "",
        "| scenario | max_loaded_loras | lora_slots | loads / evictions / slot copies | s/batch median | s/batch p90 | vs (a) | adapter work/batch (median) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in switching.values():
        lines.append(
            f"| {row['label']} | {row['max_loaded_loras']} | {row['lora_slots']} | "
            f"{row['loads']} / {row['evictions']} / {row['copies']} | "
            f"{row['median_s']:.3f} | {row['p90_s']:.3f} | {row['median_s'] / base:.2f}x | "
            f"{ms(row['adapter_median_s'])} |")
    floor = abs(switching["a2"]["median_s"] - base)

    def versus(x: str, y: str) -> str:
        """The difference of two scenarios' medians, flagged when it is no larger than the
        difference between the two identical no-adapter replicas: noise, not a cost."""
        diff = switching[x]["median_s"] - switching[y]["median_s"]
        noise = " (within the noise: no more than (a') - (a))" if abs(diff) <= floor else ""
        return f"{diff * 1000:+.1f} ms per batch{noise}"

    lines += [
        "",
        f"- Running with an adapter (b) vs without (a): {versus('b', 'a')}: the slot's LoRA "
        "terms and the row weights.",
        f"- Two adapters in two slots, alternating (c) vs the same adapter (b): {versus('c', 'b')}; "
        f"the adapter work measured directly: {ms(switching['c']['adapter_median_s'])}.",
        f"- Copying the other adapter into the one slot (s) vs the same adapter (b): "
        f"{versus('s', 'b')}; the copy measured directly: {ms(switching['s']['adapter_median_s'])}.",
        f"- Evict, read from disk and copy (d) vs the same adapter (b): {versus('d', 'b')}; the "
        f"adapter work measured directly: {ms(switching['d']['adapter_median_s'])}, for a "
        f"{lora_size_kib():.0f} KiB LoRA from a warm page cache; a real LoRA of tens to hundreds "
        "of MB adds its read and, on a GPU, its copy.",
        f"- Noise: the two identical no-adapter replicas (a) and (a') differ by "
        f"{floor * 1000:.1f} ms per batch in this run; differences of batch medians up to that "
        "size are not costs. The adapter work column is timed around the adapter calls alone, "
        "free of that noise.",
        "",
        "## Grouped vs mixed batches",
        "",
        f"{opts.rounds} rounds of {CONCURRENT} concurrent requests of one image each at "
        f"{opts.size}x{opts.size}, {steps}, per run; per mode, the runs interleaved round by "
        "round after a warm-up round. Grouped: a replica with one LoRA slot (jobs of different "
        "adapters in separate calls); mixed: a replica with two (one call). The references "
        "run on the mixed replica.",
        "",
    ]
    for mode, results in grouped.items():
        lines += grouped_table(results, mode, "s") + [""]
    plain = grouped["request"]["plain"]["median_s"]
    lines += [
        f"- The base model's own batch gain on this device: one call of {CONCURRENT} without "
        f"adapters takes {plain:.3f} s, two calls of {BATCH_IMAGES} (2 x (a)) {2 * base:.3f} s; "
        "a mixed batch gains what batching gains, less its rows' work in the second slot.",
    ]
    return common.write_lines(opts.out, report_name(common.device_slug(device), opts.smoke), lines)


# -- the simulated accelerator ---------------------------------------------------------

@dataclass(frozen=True)
class SimCase:
    label: str
    family: str
    size: int
    steps: int
    rank: int


SIM_CASES = [SimCase("SD 2.1 512x512, 25 steps", "sd21", 512, 25, rank) for rank in (16, 64)] + \
            [SimCase("SDXL 1024x1024, 30 steps", "sdxl", 1024, 30, rank) for rank in (16, 64)]
SIM_SMOKE_CASES = [SimCase("SD 2.1 512x512, 2 steps (smoke)", "sd21", 512, 2, 16)]
# How many times faster than the modelled H100 the simulated clock runs: the figures are
# the charged model seconds, whatever the speed.
SIM_SPEED = 20.0


def sim_adapters(case: SimCase) -> tuple[LoraRef, LoraRef]:
    return tuple(LoraRef(name, Source.parse(f"sim:lora/{case.family}/r{case.rank}-{name}"), None, 1.0)
                 for name in ("a", "b"))


def bench_sim(case: SimCase, rounds: int) -> dict[str, dict]:
    from deployments.standins.sim import COSTS

    a, b = sim_adapters(case)
    results = {}
    for mode in ("request", "step"):
        replicas = {}
        for key, slots in (("grouped", 1), ("mixed", 2)):
            replica = Replica.build(f"{case.family}-{key}-{mode}", 1, lora_slots=slots, mode=mode,
                                    source=f"sim:{case.family}", loras=(a, b))
            replica.dep.pipe.device.speed = SIM_SPEED
            replicas[key] = replica
        print(f"{case.label}, rank {case.rank}, {mode} mode", flush=True)
        results[mode] = bench_grouped(replicas, grouped_runs(a, b), mode, rounds, case.size,
                                      case.steps, charged=True)
        flops = slot_flops(replicas["mixed"].dep.pipe.unet, case.size)
        cost = COSTS[case.family]
        results[mode]["slot_flops"] = flops
        # A slot's time for a row, against the row's own UNet time (a call's fixed part aside).
        pixels = case.size * case.size
        results[mode]["slot_share"] = cost.lora_s(1, flops) / (cost.unet_s(2, pixels) - cost.unet_s(1, pixels))
    return results


def slot_flops(unet, size: int) -> float:
    """One slot's LoRA FLOPs for one row at ``size`` (what the cost model charges a row)."""
    from deployments.standins.sim import lora_flops_per_row

    names = {name for module in unet.modules() for name in getattr(module, "lora_A", {})}
    if not names:
        return 0.0
    latent = size // 8
    unet.set_adapter(sorted(names)[:1])
    unet.enable_adapters()
    try:
        return lora_flops_per_row(unet, latent, latent)
    finally:
        unet.disable_adapters()


def write_sim_report(results: dict, opts, command: str) -> Path:
    lines = [
        "# LoRA adapters on the simulated H100: grouped against mixed batches"
        + (" (smoke run, not a measurement)" if opts.smoke else ""),
        "",
        "The real SD 2.1 and SDXL deployments, batchers and LoRA slots around the simulated "
        "accelerator (`sim:<family>`, deployments/standins/sim.py): each UNet call is charged "
        "the cost model's H100 time for its rows, plus every active slot's LoRA terms for "
        "every row, counted in FLOPs from the slots' weights on the real UNet's layers and "
        "charged at the base UNet's own time per FLOP (a lower bound: LoRA's thin matmuls run "
        "below the base model's efficiency on a GPU). Adapters `sim:lora/<family>/r<rank>-a` "
        "and `-b` on the UNet's attention projections; the slots take their rank. Seconds "
        "are the simulated device's busy time per round (what the cost model charged), not "
        "this machine's.",
        f"Command: `{command}`.",
        "",
    ]
    for case, modes in results.items():
        first = next(iter(modes.values()))
        lines += [f"## {case.label}, adapters of rank {case.rank}", "",
                  f"{opts.rounds} rounds of {CONCURRENT} concurrent requests of one image per run; "
                  f"one slot's LoRA terms: {first['slot_flops'] / 1e9:.1f} GFLOP a row and step, "
                  f"charged {first['slot_share'] * 100:.2f}% of a row's own UNet time (a call's "
                  "fixed part aside).", ""]
        for mode, table in modes.items():
            rows = {key: value for key, value in table.items() if isinstance(value, dict)}
            lines += grouped_table(rows, mode, "H100 s") + [""]
    return common.write_lines(opts.out, report_name("sim-h100", opts.smoke), lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per scenario (part 1)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds of 8 requests per run (part 2; default 20, 3 with --sim)")
    parser.add_argument("--size", type=int, default=256, help="image width and height")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--sim", action="store_true",
                        help="part 2 on the simulated H100 at SD 2.1 512x512 and SDXL 1024x1024")
    parser.add_argument("--smoke", action="store_true",
                        help="2 batches, 2 rounds, 64x64, 1 step: checks the script runs")
    args = sys.argv[1:] if argv is None else argv
    opts = parser.parse_args(args)
    if opts.rounds is None:
        opts.rounds = 3 if opts.sim else 20
    if opts.smoke:
        opts.batches, opts.rounds, opts.size, opts.steps = 2, (1 if opts.sim else 2), 64, 1
    torch.set_num_threads(opts.threads)  # the replicas' pipeline threads set it too
    quiet()
    command = shlex.join(["python3", "-m", "benchmarks.loras", *args])
    if opts.sim:
        cases = SIM_SMOKE_CASES if opts.smoke else SIM_CASES
        results = {case: bench_sim(case, opts.rounds) for case in cases}
        report = write_sim_report(results, opts, command)
    else:
        replicas = {key: Replica.build(f"sd-{key}", opts.threads, capacity, slots)
                    for key, (_, capacity, slots, _) in SCENARIOS.items()}
        device = replicas["a"].dep.device
        dtype = str(replicas["a"].dep.dtype).removeprefix("torch.")
        switching = bench_switching(replicas, opts.batches, opts.size, opts.steps)
        grouped = {}
        for mode in ("request", "step"):
            pair = {key: Replica.build(f"sd-{key}-{mode}", opts.threads, 8, slots, mode)
                    for key, slots in (("grouped", 1), ("mixed", 2))}
            grouped[mode] = bench_grouped(pair, grouped_runs(ADAPTER_A, ADAPTER_B), mode, opts.rounds,
                                          opts.size, opts.steps)
        report = write_report(switching, grouped, opts, device, dtype, command)
    print(report.read_text())
    print(f"written to {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
