"""The GPU run: a time-boxed benchmark run on an offline GPU machine, with its wheel list:
benchmarks/gpu.py's measurements in the order of their value, fitted to a time budget, each
figure written the moment it exists.

    python3 -m benchmarks.gpu_run [--plan] [--budget 480] [--repeats 3] [--wheels .whl] [--out DIR] [--smoke]

It targets an offline H100 or H200 machine that runs one command for at most 10 minutes; its
Python 3.12 has PyTorch, transformers, accelerate and peft, no diffusers, spandrel or Ray, and
there is no network. This is the one command to run there,
once, in the repository root (the package is not installed there), with the wheels of ``scripts/gpu_wheels.py`` carried in ``.whl`` (docs/benchmarks.md#the-gpu-run):

1. It installs the carried wheels (``pip install --no-index --no-deps --target``, into a folder
   of its own put first on the path of this process and its children) unless each is
   installed at its version already, and checks that every requirement of diffusers,
   spandrel and pydantic is met by what is installed (scripts/gpu_wheels.py's rule).
2. It runs the plan (``--plan`` prints it with its arithmetic and exits), most valuable first:

   - phase 1: every model's module dtypes, and its peak GPU memory in one call at the
     largest batch and size configs/cluster.yaml lets it take, against `serve-app
     capacity`'s estimate for them (``off_by_more_than_15pc`` flags a miss);
   - phase 2: SDXL 1024x1024, 30 steps, batch 1, eager float16 with SDPA: latency (the
     headline figure); batch 4 at 20 steps: images/s; then the base stage of the SDXL ->
     refiner chain (40 steps to 0.8), while SDXL is loaded (loading it again in phase 3
     would cost more than the stage);
   - phase 3: eager, batch 1: SD 2.1 768x768 25 steps, the refiner stage (the chain's
     latency is both stages), the x4 upscaler from 512x768, the x2 latent upscaler from
     1024x1024, ESRGAN at 1024x1024;
   - phase 4: compiled SDXL, batch 1, 30 steps: torch.compile's default mode, then the
     replicas' own options (deployments/runtime/loading.py's COMPILE_OPTIONS), each in a process of
     its own that is killed at its cap: a variant that does not compile in time is reported
     as over its cap, not waited for. The compile time is that of the first call.

   A step starts only inside the budget; one that fails is reported and the run goes on
   (exit status 1).

Every figure is one JSON line appended to ``gpu-run-<gpu>.jsonl`` in ``--out`` (default: the
folder the environment's OUT names, else benchmarks/results), flushed and synced at once, with
a sentence under ``text`` that is printed too: a run killed at its limit still returns
everything it measured before. Each step also writes its planned and its actual seconds: the
figures to plan the next run with.

Models, specs, calls, peaks and estimates are benchmarks/gpu.py's (full-size real
architectures with random weights, the deployment classes called directly, no Ray): see its
docstring. ``--smoke`` runs the same plan on the tiny models on the CPU at tiny sizes (a
check that the run works, not a measurement).

This module imports torch, diffusers and gpu.py inside its functions only: the carried wheels
must be on the path before anything imports them (pydantic needs a typing_extensions that the
machine's may be older than, and torch imports typing_extensions).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from deployments.families import FAMILIES  # the registry, no torch

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480.0  # 8 minutes: within a 10-minute command, with room for the plan's errors
SITE = Path(tempfile.gettempdir()) / "gpu-run-site"  # where the carried wheels are installed
OFF_BY = 0.15  # a peak this far from capacity's estimate, either way, is flagged
MIN_CAP_S = 60.0  # a compiled variant with less time than this is not started

# ---------------------------------------------------------------------------------------
# The plan. Model calls are priced by the simulated accelerator's H100 cost model
# (deployments/standins/sim.py: fitted to published H100 and A100 figures, each cited there:
# SDXL 1024x1024, 30 steps, batch 1 = 2.50 s). What nothing publishes is assumed, below;
# the run writes every step's actual seconds beside its planned ones, to correct them by.
# The steps and their calls are the ones the CPU smoke run makes (tests/unit/
# test_benchmarks_gpu.py): the same plan, with tiny models.

# Python, the wheels (10 MB) installed, torch, diffusers and the deployments imported, the
# CUDA context: on the 2-core CPU machine of docs/benchmarks.md, importing gpu.py, diffusers
# and the six deployment classes takes 8 s.
START_S = 25.0
BUILD_GB_S = 1.0  # a random-weight model built on the GPU, cast and written by save_pretrained
READ_GB_S = 2.0  # from_pretrained: safetensors from the page cache to the GPU
LOAD_FIXED_S = 3.0  # a deployment beyond its bytes: classes, configs, tokenizer, pipeline views
ESTIMATE_S = 2.0  # capacity's estimate: the model built empty on the meta device
FIRST_CALL_S = 2.0  # a model's first call: its kernels loaded, cuDNN and cuBLAS set up
CHILD_START_S = 20.0  # a compiled variant's process: START_S less the wheels, with a margin
# Weights (float16 GB) of what the registry has no published size for: Real-ESRGAN x2plus
# (16.7M parameters) and the fp16-fix SDXL VAE (83.7M, the SDXL VAE's).
OTHER_FP16_GB = {"esrgan": 0.034, "sdxl-vae-fp16-fix": 0.17}


@dataclass(frozen=True)
class Variant:
    """A compiled variant of phase 4: ``mode`` None is the replicas' own COMPILE_OPTIONS."""

    family: str
    mode: str | None
    label: str
    # Planned seconds of the compile and first call (torch.compile's own figures for the
    # SDXL UNet are not published for these modes: assumed); None: the rest of the budget.
    compile_s: float | None


VARIANTS = [
    # Inductor without autotuning: about a minute and a half on the SDXL UNet (assumed).
    Variant("sdxl", "default", "SDXL compiled, torch.compile mode default", 90.0),
    # max-autotune-no-cudagraphs benchmarks kernel choices for every GEMM and convolution:
    # minutes, maybe more than any cap here; its cap is what is left.
    Variant("sdxl", None, "SDXL compiled, the replicas' options (loading.COMPILE_OPTIONS)", None),
]


class Cost:
    """A step's planned seconds, term by term (the plan prints the terms)."""

    def __init__(self):
        self.terms: list[tuple[str, float]] = []

    def add(self, label: str, seconds: float) -> "Cost":
        self.terms.append((label, seconds))
        return self

    @property
    def total(self) -> float:
        return sum(seconds for _, seconds in self.terms)

    def __str__(self) -> str:
        return " + ".join(f"{label} {seconds:.1f}" for label, seconds in self.terms)


@dataclass
class Step:
    """One step of the plan: what it runs and what it is planned to take. A compiled
    variant's process is killed at ``planned_s`` (its cap)."""

    phase: int
    title: str
    cost: Cost
    action: Callable[["Run"], None] | None  # None: the start, counted but not a step
    capped: bool = False

    @property
    def planned_s(self) -> float:
        return self.cost.total


def weights_gb(name: str) -> float:
    return FAMILIES[name].published_fp16_gb or OTHER_FP16_GB[name]


def replica_batch(name: str) -> int:
    """configs/cluster.yaml's max_batch_images for ``name``: the most images of one call
    there, as the run's spec and capacity's batch have it (no max_n is larger, but ESRGAN's,
    which runs in chunks of max_batch_images)."""
    from benchmarks.gpu import cluster_model

    return cluster_model(name)["batching"]["max_batch_images"]


def case_of(key: str, family: str | None = None):
    """gpu.py's case ``key`` (of ``family``, for the chain's two stages)."""
    from benchmarks.gpu import CASES

    return next(c for c in CASES if c.key == key and (family is None or c.family == family))


def phase1_case(name: str):
    """The case whose size is ``name``'s largest in configs/cluster.yaml (each family's first)."""
    from benchmarks.gpu import CASES

    return next(c for c in CASES if c.family == name)


def h100_call_s(case, images: int, steps: int) -> float:
    """One call of ``images`` images of ``case`` at ``steps`` steps on an H100, by the
    simulated accelerator's cost model (a chain's stage runs its share of the steps)."""
    from deployments.standins.sim import COSTS
    from benchmarks.gpu import HIGH_NOISE_FRAC

    width, height = case.size
    out_pixels = width * height * (FAMILIES[case.family].upscale_factor or 1) ** 2
    cost = COSTS[case.family]
    if case.kind == "chain_base":
        return cost.call_s(images, out_pixels, round(steps * HIGH_NOISE_FRAC), decode=False)
    if case.kind == "refine":
        return cost.call_s(images, out_pixels, max(1, round(steps * (1 - HIGH_NOISE_FRAC))))
    return cost.call_s(images, out_pixels, steps)


def load_cost(cost: Cost, name: str) -> Cost:
    gb = weights_gb(name)
    return cost.add(f"load {gb:.2f} GB at {READ_GB_S:.0f} GB/s + {LOAD_FIXED_S:.0f} s", gb / READ_GB_S + LOAD_FIXED_S)


def timed_cost(cost: Cost, case, images: int, steps: int, repeats: int, warm: bool = True) -> Cost:
    """A warm-up call of the case's few steps (unless the shapes are warm), then ``repeats``."""
    if warm:
        cost.add(f"warm-up {images} x {case.few_steps} steps", h100_call_s(case, images, case.few_steps))
    per_call = h100_call_s(case, images, steps)
    return cost.add(f"{repeats} x {per_call:.2f} s ({images} x {steps} steps)", repeats * per_call)


def make_plan(opts) -> list[Step]:
    """The run's steps in the order of their value, each with its planned seconds."""
    from benchmarks.gpu import MODELS

    repeats, steps = opts.repeats, [Step(0, "start: wheels, Python, torch, diffusers, CUDA context",
                                         Cost().add("start", START_S), None)]
    for name in MODELS:  # phase 1
        case, batch = phase1_case(name), replica_batch(name)
        gb = weights_gb(name) + (OTHER_FP16_GB["sdxl-vae-fp16-fix"] if name == "sdxl" else 0.0)
        cost = Cost().add(f"build {gb:.2f} GB at {BUILD_GB_S:.0f} GB/s", gb / BUILD_GB_S).add("estimate", ESTIMATE_S)
        load_cost(cost, name).add("first call", FIRST_CALL_S)
        cost.add(f"{batch} x {case.few_steps} steps", h100_call_s(case, batch, case.few_steps))
        if name == "sdxl":  # the base stage's latents, the refiner's input at its batch
            chain = case_of("sdxl+refiner", "sdxl")
            cost.add("its chain latents", h100_call_s(chain, replica_batch("sdxl-refiner"), chain.few_steps))
        steps.append(Step(1, f"{name}: module dtypes; peak memory at {batch} images against capacity's estimate",
                          cost, lambda run, name=name: measure_memory(run, name)))

    sdxl, sdxl_20, chain = case_of("sdxl"), case_of("sdxl-20"), case_of("sdxl+refiner", "sdxl")
    batched = replica_batch("sdxl")
    steps += [
        Step(2, "SDXL 1024x1024, 30 steps, batch 1, eager: latency (the headline)",
             timed_cost(load_cost(Cost(), "sdxl"), sdxl, 1, sdxl.steps, repeats), sdxl_latency),
        Step(2, f"SDXL 1024x1024, 20 steps, batch {batched}, eager: images/s",
             timed_cost(Cost(), sdxl_20, batched, sdxl_20.steps, repeats), sdxl_batched),
        Step(2, "SDXL -> refiner, 40 steps: the base stage to 0.8, batch 1",
             timed_cost(Cost(), chain, 1, chain.steps, repeats, warm=False), chain_base_stage),
    ]
    refine = case_of("sdxl+refiner", "sdxl-refiner")
    phase3 = [(case_of("sd21"), "SD 2.1 768x768, 25 steps"), (refine, "SDXL -> refiner: the refiner stage from 0.8"),
              (case_of("x4-upscaler"), "x4 upscaler from 512x768, 20 steps"),
              (case_of("x2-latent-upscaler"), "x2 latent upscaler from 1024x1024, 20 steps"),
              (case_of("esrgan"), "ESRGAN x2 at 1024x1024")]
    for case, title in phase3:
        cost = timed_cost(load_cost(Cost(), case.family), case, 1, case.steps, repeats)
        steps.append(Step(3, f"{title}, batch 1, eager", cost, lambda run, case=case: eager_case(run, case)))

    for variant in VARIANTS:
        case = case_of("sdxl")
        cost = Cost().add("process start", CHILD_START_S)
        load_cost(cost, variant.family)
        if variant.compile_s is None:
            rest = opts.budget - sum(s.planned_s for s in steps) - cost.total
            cost.add("the rest of the budget", max(MIN_CAP_S, rest))
        else:
            cost.add("compile + first call", variant.compile_s)
            timed_cost(cost, case, 1, case.steps, repeats, warm=False)
        steps.append(Step(4, f"{variant.label}: compile time, then 30 steps batch 1", cost,
                          lambda run, variant=variant, cap=cost.total: compiled_variant(run, variant, cap),
                          capped=True))
    return steps


def format_plan(steps: list[Step], budget: float) -> str:
    eager = sum(s.planned_s for s in steps if s.phase < 4)
    total = sum(s.planned_s for s in steps)
    lines = [f"The GPU run's plan: {budget:.0f} s budget, H100-class GPU (calls priced by "
             "deployments/standins/sim.py's H100 cost model; the rest assumed, see benchmarks/gpu_run.py)",
             f"{'phase':>5} {'planned s':>9} {'by s':>6}  step: arithmetic (s)"]
    done = 0.0
    for step in steps:
        done += step.planned_s
        cap = " (its cap)" if step.capped else ""
        lines.append(f"{step.phase:>5} {step.planned_s:>9.1f} {done:>6.0f}  {step.title}{cap}: {step.cost}")
    lines.append(f"eager (phases 0-3): {eager:.0f} s; compiled variants (phase 4, their caps): "
                 f"{total - eager:.0f} s; in all {total:.0f} s of the {budget:.0f} s budget"
                 + ("" if total <= budget else ": OVER BUDGET"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Figures


class Figures:
    """The run's figures file: one JSON object a line, appended, flushed and synced the
    moment it exists, so that a run killed at its limit keeps every line before. Each
    write opens the file anew: a compiled variant's process appends to it too."""

    def __init__(self, path: Path, t0: float):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.t0 = path, t0

    def write(self, phase: int, figure: str, text: str, **data: Any) -> dict:
        record = {"phase": phase, "figure": figure, "t_s": round(time.time() - self.t0, 2), **data, "text": text}
        with open(self.path, "a") as file:
            file.write(json.dumps(record, default=str) + "\n")
            file.flush()
            os.fsync(file.fileno())
        print(f"[{record['t_s']:6.1f} s] phase {phase}: {text}", flush=True)
        return record


def figures_name(device: str, smoke: bool) -> str:
    from benchmarks import common

    return f"gpu-run-{common.device_slug(device)}{'-smoke' if smoke else ''}.jsonl"


def gib(value: float) -> float:
    return round(value / 1024**3, 3)


# ---------------------------------------------------------------------------------------
# Running


class Run:
    """What the steps share: options, figures, the weights, the deadline, the model loaded
    now, the chain's latents and its base stage's time."""

    def __init__(self, opts, figures: Figures, device: str, t0: float):
        from benchmarks.gpu import Sources

        self.opts, self.figures, self.device, self.t0 = opts, figures, device, t0
        self.deadline = t0 + opts.budget
        self.sources = Sources(opts.smoke, device)
        self.dep = self.loaded = None
        self.base = 0
        self.latents: dict[int, Any] = {}
        self.chain_base_s: float | None = None
        self.failures = 0

    def size(self, case) -> tuple[int, int]:
        return case.smoke_size if self.opts.smoke else case.size

    def steps(self, case) -> int:
        return case.few_steps if self.opts.smoke else case.steps

    def model(self, name: str):
        """``name``'s eager deployment, as a replica of configs/cluster.yaml gets it; loaded
        alone (the one loaded before is freed)."""
        from benchmarks.gpu import load_model

        if self.loaded is None or self.loaded.family != name:
            self.free()
            self.dep, self.loaded, self.base = load_model(name, False, self.sources, replica_batch(name))
        return self.dep

    def free(self) -> None:
        from benchmarks.gpu import free_model

        if self.dep is not None:
            dep, self.dep, self.loaded = self.dep, None, None
            free_model(dep)

    def do(self, step: Step) -> None:
        if time.time() >= self.deadline:
            self.figures.write(step.phase, "step", f"{step.title}: skipped, the budget is spent",
                               step=step.title, status="skipped", planned_s=round(step.planned_s, 1))
            return
        start = time.perf_counter()
        status = "done"
        try:
            step.action(self)
        except Exception as exc:  # noqa: BLE001 - reported; the next steps still run
            traceback.print_exc()
            status = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
            self.failures += 1
            self.free()
        actual = time.perf_counter() - start
        self.figures.write(step.phase, "step",
                           f"{step.title}: {status} in {actual:.1f} s (planned {step.planned_s:.1f} s)", step=step.title, status=status, planned_s=round(step.planned_s, 1),
                           actual_s=round(actual, 1))

    def dtype(self) -> str:
        """The loaded replica's dtype: the spec's on CUDA, its CPU dtype on the CPU."""
        spec = self.loaded.spec
        return spec.dtype if self.device == "cuda" else spec.cpu_dtype

    def timing_figure(self, phase: int, label: str, timing, verdict: str = "", **data) -> dict:
        """A case's latency and images/s (and ``verdict``, a goal's)."""
        median = timing.median_s
        return self.figures.write(
            phase, "latency", f"{label}: median {median:.3f} s ({len(timing.seconds)} calls: "
            f"{', '.join(f'{s:.3f}' for s in timing.seconds)}), {timing.batch / median:.2f} images/s{verdict}",
            case=timing.case.key, family=timing.case.family, batch=timing.batch, compiled=timing.compiled,
            median_s=round(median, 4), seconds=[round(s, 4) for s in timing.seconds],
            images_per_s=round(timing.batch / median, 3), **data)


def measure_memory(run: Run, name: str) -> None:
    """Phase 1 for one model: its modules' dtypes, and its peak GPU memory in one call at
    the largest batch and size configs/cluster.yaml gives it, against capacity's estimate."""
    from benchmarks.gpu import capacity_estimate, cluster_model, time_case

    start, built_before = time.perf_counter(), set(run.sources.build_s)
    dep = run.model(name)  # builds its weights first (and its VAE's)
    spec, case, expected_dtype = run.loaded.spec, phase1_case(name), run.dtype()
    odd = {module: dtypes for module, dtypes in run.loaded.dtypes.items() if dtypes != expected_dtype}
    run.figures.write(1, "dtypes", f"{name}: " + (f"every module {expected_dtype}" if not odd else
                                                  ", ".join(f"{m} {d}" for m, d in odd.items())
                                                  + f" (the replica's dtype is {expected_dtype})"),
                      model=name, dtypes=run.loaded.dtypes, expected=expected_dtype, other_dtypes=odd,
                      build_s={k: round(v, 1) for k, v in run.sources.build_s.items() if k not in built_before},
                      load_s=round(run.loaded.load_s, 1), setup_s=round(time.perf_counter() - start, 1))
    model = cluster_model(name)
    try:
        estimate = capacity_estimate(spec, case.size, model["batching"]["max_batch_images"],
                                     model["limits"]["max_n"], run.opts.smoke)
        batch = estimate.batch
    except Exception as exc:  # noqa: BLE001 - the measurement stands without it
        traceback.print_exc()
        estimate, batch = None, spec.max_batch_images
        run.figures.write(1, "estimate", f"{name}: capacity's estimate failed: {type(exc).__name__}: {exc}",
                          model=name, status="failed")
    if case.kind == "refine" and batch not in run.latents:
        raise RuntimeError(f"no SDXL latents of {batch} images to refine: the sdxl step did not make them")
    size, steps = run.size(case), case.few_steps
    timing = time_case(dep, case, batch, size, steps, run.latents, warmup=0, repeats=1, base=run.base)
    data = {"model": name, "batch": batch, "size": "x".join(map(str, case.size)), "steps": steps,
            "call_s": round(timing.seconds[0], 3), "measured_gib": None if timing.peak is None else gib(timing.peak)}
    text = f"{name}: {batch} images at {data['size']}"
    if run.opts.smoke:
        text += f" (run at {size[0]}x{size[1]}, tiny)"
    text += ": peak " + ("n/a (CPU)" if timing.peak is None else f"{gib(timing.peak):.2f} GiB")
    if estimate is not None:
        expected = estimate.resident_weights + estimate.activation
        data.update(estimate_gib=gib(expected), estimate_total_gib=gib(estimate.total), peak_phase=estimate.peak_phase)
        text += f" against capacity's {gib(expected):.2f} GiB (weights + activations, peak in {estimate.peak_phase})"
        if timing.peak is not None:
            ratio = timing.peak / expected
            data.update(ratio=round(ratio, 3), off_by_more_than_15pc=abs(ratio - 1) > OFF_BY)
            text += f": {ratio:.2f}x" + (" -- OFF BY MORE THAN 15 %" if abs(ratio - 1) > OFF_BY else "")
    run.figures.write(1, "peak_memory", text, **data)
    if name == "sdxl":  # the refiner's input at its batch, as the chain hands it over
        chain = case_of("sdxl+refiner", "sdxl")
        time_case(dep, chain, replica_batch("sdxl-refiner"), size, chain.few_steps, run.latents, warmup=0, repeats=1)


def on_h100(run: Run) -> bool:
    import torch

    return run.device == "cuda" and "H100" in torch.cuda.get_device_name(0)


def goal_text(run: Run, goal: str, met: bool) -> tuple[str, bool | None]:
    """The verdict on the target ``goal`` (judged on an H100 only), and whether it was met."""
    if not on_h100(run):
        return f"; goal {goal} on an H100: not judged (not an H100)", None
    return f"; goal {goal} on an H100: {'met' if met else 'NOT MET'}", met


def sdxl_latency(run: Run) -> None:
    """Phase 2's headline: SDXL 1024x1024, 30 steps, batch 1, eager."""
    from benchmarks.gpu import GOAL_LATENCY_S, time_case

    dep, case = run.model("sdxl"), case_of("sdxl")
    attention = sorted({type(p).__name__ for p in dep.pipe.unet.attn_processors.values()})
    timing = time_case(dep, case, 1, run.size(case), run.steps(case), run.latents, warmup=1,
                       repeats=run.opts.repeats, warmup_steps=case.few_steps)
    verdict, met = goal_text(run, f"<= {GOAL_LATENCY_S} s", timing.median_s <= GOAL_LATENCY_S)
    run.timing_figure(2, f"SDXL 1024x1024, {case.steps} steps, batch 1, eager {run.dtype()}, "
                      f"attention {'/'.join(attention)}", timing, verdict, headline=True, dtype=run.dtype(),
                      attention=attention, goal_s=GOAL_LATENCY_S, goal_met=met)


def sdxl_batched(run: Run) -> None:
    from benchmarks.gpu import GOAL_IMAGES_PER_S, time_case

    dep, case, batch = run.model("sdxl"), case_of("sdxl-20"), replica_batch("sdxl")
    timing = time_case(dep, case, batch, run.size(case), run.steps(case), run.latents, warmup=1,
                       repeats=run.opts.repeats, warmup_steps=case.few_steps)
    verdict, met = goal_text(run, f">= {GOAL_IMAGES_PER_S} images/s", batch / timing.median_s >= GOAL_IMAGES_PER_S)
    run.timing_figure(2, f"SDXL 1024x1024, {case.steps} steps, batch {batch}, eager", timing, verdict,
                      goal_images_per_s=GOAL_IMAGES_PER_S, goal_met=met)


def chain_base_stage(run: Run) -> None:
    from benchmarks.gpu import time_case

    dep, case = run.model("sdxl"), case_of("sdxl+refiner", "sdxl")
    timing = time_case(dep, case, 1, run.size(case), run.steps(case), run.latents, warmup=0, repeats=run.opts.repeats)
    run.chain_base_s = timing.median_s
    run.timing_figure(2, f"SDXL -> refiner, {case.steps} steps: the base stage (to 0.8), batch 1", timing,
                      stage="base")


def eager_case(run: Run, case) -> None:
    """Phase 3: one case at batch 1, eager; the refiner's also gives the chain's latency."""
    from benchmarks.gpu import time_case

    dep = run.model(case.family)
    if case.kind == "refine" and 1 not in run.latents:
        raise RuntimeError("no SDXL latents to refine: the chain's base stage did not run")
    timing = time_case(dep, case, 1, run.size(case), run.steps(case), run.latents, warmup=1,
                       repeats=run.opts.repeats, warmup_steps=case.few_steps)
    run.timing_figure(3, f"{case.label}, batch 1, eager" + (": the refiner stage" if case.kind == "refine" else ""),
                      timing, **({"stage": "refiner"} if case.kind == "refine" else {}))
    if case.kind == "refine" and run.chain_base_s is not None:
        total = run.chain_base_s + timing.median_s
        run.figures.write(3, "latency", f"{case.label}, batch 1, eager: {total:.3f} s "
                          f"(base {run.chain_base_s:.3f} + refiner {timing.median_s:.3f})",
                          case=case.key, batch=1, compiled=False, median_s=round(total, 4),
                          stages_s=[round(run.chain_base_s, 4), round(timing.median_s, 4)])


def compiled_variant(run: Run, variant: Variant, cap: float) -> None:
    """Phase 4: the variant in a process of its own, killed at its cap: its planned seconds,
    or what is left of the budget if less; the last takes all that is left. Its figures go
    to the same file."""
    run.free()  # its GPU memory, for the variant's process
    left = run.deadline - time.time()
    cap = left if variant.compile_s is None else min(cap, left)
    if cap < MIN_CAP_S:
        run.figures.write(4, "compile", f"{variant.label}: not started, {cap:.0f} s left in the budget",
                          variant=variant.label, status="no time")
        return
    argv = [sys.executable, "-m", "benchmarks.gpu_run", "--variant", f"{variant.family}:{variant.mode or ''}",
            "--figures", str(run.figures.path.resolve()), "--t0", repr(run.t0), "--repeats", str(run.opts.repeats),
            "--built", json.dumps(run.sources.built)] + (["--smoke"] if run.opts.smoke else [])
    run_capped(run.figures, variant.label, argv, cap)  # over its cap is a figure, not a failure


def run_capped(figures: Figures, label: str, argv: list[str], cap_s: float) -> bool:
    """Run ``argv`` in a process group of its own; at ``cap_s`` kill the group (the compile
    workers too) and report the variant as over its cap. True if it finished in time. It runs
    in the repository root, where ``-m benchmarks...`` finds this package."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, start_new_session=True)
    try:
        code = child.wait(timeout=cap_s)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        figures.write(4, "compile", f"{label}: over its cap of {cap_s:.0f} s: not compiled and timed in "
                      "time (stopped, not waited for)", variant=label, status="over cap", cap_s=round(cap_s, 1),
                      seconds=round(time.perf_counter() - start, 1))
        return False
    if code != 0:
        raise RuntimeError(f"{label}: its process exited with {code}")
    return True


def run_variant(opts) -> int:
    """A compiled variant's own process: load the model compiled, time the first call (the
    compile), then the timed calls; every figure to the parent's file."""
    from benchmarks import common
    import deployments.runtime.loading as loading
    from benchmarks.gpu import Sources, bench_device, free_model, load_model, run_call, time_case

    family, mode = opts.variant.split(":")
    if mode:  # the variant's mode, where load_pipeline reads the options
        loading.COMPILE_OPTIONS = {**loading.COMPILE_OPTIONS, "mode": mode}
    label = next(v.label for v in VARIANTS if v.family == family and (v.mode or "") == mode)
    device = bench_device(opts.smoke)
    common.quiet()
    figures = Figures(opts.figures, opts.t0)
    dep, loaded, _ = load_model(family, True, Sources(opts.smoke, device, built=json.loads(opts.built)),
                                replica_batch(family))
    figures.write(4, "variant_loaded", f"{label}: loaded in {loaded.load_s:.1f} s, options {loading.COMPILE_OPTIONS}",
                  variant=label, load_s=round(loaded.load_s, 1), options=loading.COMPILE_OPTIONS)
    case = case_of("sdxl")
    size = case.smoke_size if opts.smoke else case.size
    seconds, _ = run_call(dep, case, 1, size, case.few_steps, 0, {})
    figures.write(4, "compile", f"{label}: compile + first call ({case.few_steps} steps) {seconds:.1f} s",
                  variant=label, status="compiled", compile_and_first_call_s=round(seconds, 2),
                  first_call_steps=case.few_steps)
    steps = case.few_steps if opts.smoke else case.steps
    timing = time_case(dep, case, 1, size, steps, {}, warmup=0, repeats=opts.repeats)
    median = timing.median_s
    figures.write(4, "latency", f"{label}: SDXL 1024x1024, {steps} steps, batch 1: median {median:.3f} s "
                  f"({', '.join(f'{s:.3f}' for s in timing.seconds)})", variant=label, case=case.key, batch=1,
                  compiled=True, median_s=round(median, 4), seconds=[round(s, 4) for s in timing.seconds])
    free_model(dep)
    return 0


# ---------------------------------------------------------------------------------------
# The wheels


def gpu_wheels():
    """scripts/gpu_wheels.py, loaded from its path: ``scripts`` is a folder, not a package of
    ours, and the machine may have a package of that name."""
    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "scripts" / "gpu_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_wheels(folder: Path) -> str:
    """Install the wheels in ``folder`` into SITE, first on the path of this process and of
    its children, unless each is installed at its version already (a machine with the
    project installed, or a second run). Returns what it did."""
    from packaging.utils import parse_wheel_filename

    wheels = sorted(folder.glob("*.whl"))
    installed = gpu_wheels().installed_versions()
    named = [parse_wheel_filename(wheel.name)[:2] for wheel in wheels]
    if all(installed.get(name) == str(version) for name, version in named):
        return f"{len(wheels)} carried wheels, each installed already" if wheels else "no wheels carried"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)
    sys.path.insert(0, str(SITE))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE), *filter(None, [os.environ.get("PYTHONPATH")])])
    importlib.invalidate_caches()
    return f"installed {len(wheels)} wheels into {SITE}: {', '.join(w.name for w in wheels)}"


def requirements_figure(figures: Figures) -> None:
    """Whether what is installed now meets every requirement of diffusers, spandrel and
    pydantic (scripts/gpu_wheels.py's rule, against this machine)."""
    from packaging.utils import canonicalize_name

    wheels = gpu_wheels()
    installed = wheels.installed_versions()
    carried = {n: installed[n] for n in map(canonicalize_name, wheels.WHEELS) if n in installed}
    problems = wheels.unmet(wheels.ROOTS, carried, installed)
    figures.write(0, "requirements", "requirements of " + ", ".join(wheels.ROOTS) + (
        ": all met" if not problems else ": UNMET: " + "; ".join(problems)), unmet=problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", action="store_true", help="print the plan and its budget, and exit")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds the whole run may take")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per figure")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the carried wheels")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    parser.add_argument("--smoke", action="store_true", help="the tiny models on the CPU: checks the run works")
    # A compiled variant's own process (phase 4), started by the run.
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--figures", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--built", default="{}", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.plan:
        steps = make_plan(opts)
        print(format_plan(steps, opts.budget))
        return 0 if sum(step.planned_s for step in steps) <= opts.budget else 1
    if opts.variant:
        return run_variant(opts)

    t0 = time.time()
    # --smoke runs where the project is installed: nothing to install.
    wheels = "--smoke: no wheels installed" if opts.smoke else ensure_wheels(opts.wheels)
    from benchmarks import common
    from benchmarks.gpu import bench_device

    device = bench_device(opts.smoke)
    if device != "cuda" and not opts.smoke:
        parser.error("no CUDA device: on a CPU, run --smoke")
    common.quiet()
    figures = Figures(opts.out / figures_name(device, opts.smoke), t0)
    figures.write(0, "machine", f"{common.machine(device, 'transformers', 'accelerate', 'spandrel')}; {wheels}",
                  command=" ".join(["python3", "-m", "benchmarks.gpu_run", *(argv if argv is not None else sys.argv[1:])]))
    requirements_figure(figures)
    steps = make_plan(opts)
    figures.write(0, "plan", format_plan(steps, opts.budget), budget_s=opts.budget,
                  steps=[{"phase": s.phase, "step": s.title, "planned_s": round(s.planned_s, 1)} for s in steps])
    run = Run(opts, figures, device, t0)
    for step in steps:
        if step.action is not None:
            run.do(step)
    run.free()
    figures.write(0, "end", f"done in {time.time() - t0:.0f} s of the {opts.budget:.0f} s budget; "
                  f"{run.failures} step(s) failed; figures in {figures.path}", failures=run.failures)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
