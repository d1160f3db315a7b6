"""The GPU run: a time-boxed benchmark run on an offline GPU machine, with its wheel list:
benchmarks/gpu.py's measurements in the order of their value, fitted to a time budget, each
figure written the moment it exists.

    python3 -m benchmarks.gpu_run [--plan] [--budget 480] [--repeats 3] [--wheels .whl] [--out DIR] [--smoke] [--no-loras]

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
   - phase 4: LoRA adapters in slots (deployments/runtime/lora_slots.py), eager: random
     adapters of rank 16 on the attention projections, built in code for the served UNet
     (real weights where the local Hub cache holds them, else the full-size random ones);
     four concurrent one-image jobs, half adapter a and half b, mixed in one call against
     grouped (one adapter a call, as ``lora_slots: 1`` batches), at SD 2.1 512x512 (and
     without adapters) and SDXL 1024x1024; then 12 adapter and weight switches on SD 2.1;
   - phase 5: compiled, batch 1: SDXL 30 steps in torch.compile's default mode, then the SD 2.1
     LoRA replica compiled once (mode default) making the same 12 switches, its recompiles
     counted, against eager; with ``--no-loras`` (no phase 4) the SDXL variant of the
     replicas' own options (deployments/runtime/loading.py's COMPILE_OPTIONS) instead. Each in
     a process of its own that is killed at its cap: a variant that does not compile in time
     is reported as over its cap, not waited for. The compile time is that of the first call.

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
    """A compiled variant of phase 5: ``mode`` None is the replicas' own COMPILE_OPTIONS."""

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


# LoRA figures (phases 4 and 5; --no-loras leaves them out): random adapters of a realistic
# rank on the attention projections of the served UNet (there are no tiny LoRAs of the real
# models, and the machine has no network), in adapter slots (deployments/runtime/lora_slots.py).
LORA_RANK = 16
LORA_SLOTS = 2
LORA_NAMES = ("a", "b", "c")  # three adapters for two slots: switching copies weights into slots
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # what diffusers' LoRA training scripts target
LORA_BUILD_S = 2.0  # one random LoRA: an empty UNet from its config, peft's layers, saved (assumed)
LORA_COMPILE_MODE = "default"  # max-autotune would take minutes a graph (phase 5's SDXL variants)
# A compiled replica's adapter and weight switches, one one-image job a call: single adapters,
# combinations, weights 0, negative and above 1, and the third adapter entering a slot.
LORA_SWITCHES = [(("a", 1.0),), (("b", 1.0),), (("a", 0.5),), (("a", 1.0), ("b", 0.5)), (("c", 1.0),),
                 (("b", -0.5),), (("a", 0.8), ("c", 0.3)), (("c", 0.0),), (("b", 1.0), ("c", 1.0)),
                 (("a", 1.2),), (("c", 0.7),), (("a", 1.0), ("b", 1.0))]
SMOKE_SWITCHES = 5  # --smoke: the first five (every kind of switch, c entering a slot included)


def lora_cases():
    """The LoRA figures' cases: SD 2.1 512x512 at 20 steps, SDXL 1024x1024 at 10 steps (the
    mixed-to-grouped ratio is a per-step one; fewer SDXL steps keep the part within minutes)."""
    from benchmarks.gpu import Case

    return {"sd21": Case("lora-sd21", "SD 2.1 512x512, 20 steps", "sd21", (512, 512), 20, 7.5, "text_to_image"),
            "sdxl": Case("lora-sdxl", "SDXL 1024x1024, 10 steps", "sdxl", (1024, 1024), 10, 5.0, "text_to_image")}


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

    loras = not getattr(opts, "no_loras", False)
    if loras:
        steps += lora_eager_steps(repeats)
    # Phase 5: the default-mode SDXL variant, then what takes the rest of the budget: the
    # compiled LoRA replica, or (--no-loras) the replicas' own options.
    variants = [v for v in VARIANTS if v.compile_s is not None] if loras else VARIANTS
    for variant in variants:
        case = case_of("sdxl")
        cost = Cost().add("process start", CHILD_START_S)
        load_cost(cost, variant.family)
        if variant.compile_s is None:
            rest = opts.budget - sum(s.planned_s for s in steps) - cost.total
            cost.add("the rest of the budget", max(MIN_CAP_S, rest))
        else:
            cost.add("compile + first call", variant.compile_s)
            timed_cost(cost, case, 1, case.steps, repeats, warm=False)
        steps.append(Step(5, f"{variant.label}: compile time, then 30 steps batch 1", cost,
                          lambda run, variant=variant, cap=cost.total: compiled_variant(run, variant, cap),
                          capped=True))
    if loras:
        case = lora_cases()["sd21"]
        cost = Cost().add("process start", CHILD_START_S)
        load_cost(cost, "sd21")
        rest = opts.budget - sum(s.planned_s for s in steps) - cost.total
        cost.add("the rest of the budget", max(MIN_CAP_S, rest))
        steps.append(Step(5, f"LoRA, {case.label}, compiled (mode {LORA_COMPILE_MODE}): compile once, then "
                             f"{len(LORA_SWITCHES)} adapter and weight switches: seconds a call, recompiles",
                          cost, lambda run: lora_compiled(run), capped=True))
    return steps


def lora_eager_steps(repeats: int) -> list[Step]:
    """Phase 4: per model, four concurrent one-image jobs, half adapter a, half b: mixed in
    one call (lora_slots 2) against grouped (one adapter a call, as lora_slots 1 batches);
    SD 2.1 also without adapters, and the switches the compiled replica makes, eager."""
    steps = []
    for family, case in lora_cases().items():
        names = LORA_NAMES if family == "sd21" else LORA_NAMES[:2]
        cost = Cost().add(f"{len(names)} LoRAs x {LORA_BUILD_S:.0f} s", len(names) * LORA_BUILD_S)
        load_cost(cost, family).add("first call", FIRST_CALL_S)
        cost.add(f"warm-ups 4 + 2 x 2 x {case.few_steps} steps",
                 h100_call_s(case, 4, case.few_steps) + 2 * h100_call_s(case, 2, case.few_steps))
        mixed, grouped = h100_call_s(case, 4, case.steps), 2 * h100_call_s(case, 2, case.steps)
        cost.add(f"{repeats} x mixed {mixed:.2f} s (4 x {case.steps} steps)", repeats * mixed)
        cost.add(f"{repeats} x grouped {grouped:.2f} s (2 calls of 2)", repeats * grouped)
        title = f"LoRA, {case.label}: 4 one-image jobs, 2 x adapter a + 2 x b (rank {LORA_RANK}), mixed against grouped"
        if family == "sd21":
            cost.add(f"{repeats} x no adapters {mixed:.2f} s", repeats * mixed)
            single = h100_call_s(case, 1, case.steps)
            cost.add(f"{len(LORA_SWITCHES)} switches x {single:.2f} s", len(LORA_SWITCHES) * single)
            title += f", no adapters; {len(LORA_SWITCHES)} adapter switches, eager"
        steps.append(Step(4, title, cost, lambda run, family=family: lora_batches(run, family)))
    return steps


def format_plan(steps: list[Step], budget: float) -> str:
    eager = sum(s.planned_s for s in steps if s.phase < 5)
    total = sum(s.planned_s for s in steps)
    lines = [f"The GPU run's plan: {budget:.0f} s budget, H100-class GPU (calls priced by "
             "deployments/standins/sim.py's H100 cost model; the rest assumed, see benchmarks/gpu_run.py)",
             f"{'phase':>5} {'planned s':>9} {'by s':>6}  step: arithmetic (s)"]
    done = 0.0
    for step in steps:
        done += step.planned_s
        cap = " (its cap)" if step.capped else ""
        lines.append(f"{step.phase:>5} {step.planned_s:>9.1f} {done:>6.0f}  {step.title}{cap}: {step.cost}")
    lines.append(f"eager (phases 0-4): {eager:.0f} s; compiled variants (phase 5, their caps): "
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
        # The LoRA figures' adapters (family -> name -> folder), in a folder of their own,
        # and the eager replica's median seconds a switch (the compiled one's reference).
        self.lora_tmp = tempfile.TemporaryDirectory(prefix="gpu-run-loras-")
        self.loras: dict[str, dict[str, str]] = {}
        self.lora_sources: dict[str, tuple[str, str]] = {}
        self.lora_eager_switch_s: float | None = None

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
    """Phase 5: the variant in a process of its own, killed at its cap: its planned seconds,
    or what is left of the budget if less; the last takes all that is left. Its figures go
    to the same file."""
    run.free()  # its GPU memory, for the variant's process
    left = run.deadline - time.time()
    cap = left if variant.compile_s is None else min(cap, left)
    if cap < MIN_CAP_S:
        run.figures.write(5, "compile", f"{variant.label}: not started, {cap:.0f} s left in the budget",
                          variant=variant.label, status="no time")
        return
    argv = [sys.executable, "-m", "benchmarks.gpu_run", "--variant", f"{variant.family}:{variant.mode or ''}",
            "--figures", str(run.figures.path.resolve()), "--t0", repr(run.t0), "--repeats", str(run.opts.repeats),
            "--built", json.dumps(run.sources.built)] + (["--smoke"] if run.opts.smoke else [])
    run_capped(run.figures, variant.label, argv, cap)  # over its cap is a figure, not a failure


def run_capped(figures: Figures, label: str, argv: list[str], cap_s: float, phase: int = 5) -> bool:
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
        figures.write(phase, "compile", f"{label}: over its cap of {cap_s:.0f} s: not compiled and timed in "
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
    figures.write(5, "variant_loaded", f"{label}: loaded in {loaded.load_s:.1f} s, options {loading.COMPILE_OPTIONS}",
                  variant=label, load_s=round(loaded.load_s, 1), options=loading.COMPILE_OPTIONS)
    case = case_of("sdxl")
    size = case.smoke_size if opts.smoke else case.size
    seconds, _ = run_call(dep, case, 1, size, case.few_steps, 0, {})
    figures.write(5, "compile", f"{label}: compile + first call ({case.few_steps} steps) {seconds:.1f} s",
                  variant=label, status="compiled", compile_and_first_call_s=round(seconds, 2),
                  first_call_steps=case.few_steps)
    steps = case.few_steps if opts.smoke else case.steps
    timing = time_case(dep, case, 1, size, steps, {}, warmup=0, repeats=opts.repeats)
    median = timing.median_s
    figures.write(5, "latency", f"{label}: SDXL 1024x1024, {steps} steps, batch 1: median {median:.3f} s "
                  f"({', '.join(f'{s:.3f}' for s in timing.seconds)})", variant=label, case=case.key, batch=1,
                  compiled=True, median_s=round(median, 4), seconds=[round(s, 4) for s in timing.seconds])
    free_model(dep)
    return 0


# ---------------------------------------------------------------------------------------
# LoRA: mixed against grouped batches, and a compiled replica switching adapters


def lora_model_source(run: Run, family: str) -> tuple[str, str]:
    """The weights the LoRA figures run on, and what they are: the real model where the
    local Hub cache holds it (the machine is offline), else the run's full-size random
    weights (the tiny model with --smoke)."""
    if not run.opts.smoke:
        from huggingface_hub import try_to_load_from_cache

        repo = FAMILIES[family].hub_source
        found = try_to_load_from_cache(repo, "model_index.json")
        if isinstance(found, str) and any((Path(found).parent / "unet").glob("*.safetensors")):
            return str(Path(found).parent), f"real weights ({repo}, from the Hub cache)"
    return run.sources(family), "tiny weights" if run.opts.smoke else "full-size random weights"


def build_random_lora(family: str, model: str, folder: Path, rank: int, seed: int) -> int:
    """Write a random LoRA of ``rank`` for the UNet of ``model`` (a pipeline folder) into
    ``folder``, as deployments/standins/tiny.py's build_tiny_lora writes its tiny ones: peft
    layers on the attention projections (of a UNet built empty from its config: only their
    shapes are read), converted by ``convert_state_dict_to_diffusers`` and saved by the
    pipeline class's ``save_lora_weights``. lora_A as peft draws it (1/sqrt(fan-in)), lora_B
    small rather than zero, so the adapter changes the image a little. Returns its bytes."""
    import diffusers
    import torch
    from accelerate import init_empty_weights
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    config = diffusers.UNet2DConditionModel.load_config(Path(model) / "unet")
    with init_empty_weights():
        unet = diffusers.UNet2DConditionModel.from_config(config)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS)))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, empty in get_peft_model_state_dict(unet).items():
        std = empty.shape[1] ** -0.5 if "lora_A" in key else 0.01
        state[key] = (torch.randn(tuple(empty.shape), generator=generator) * std).to(torch.float16)
    pipeline_class = getattr(diffusers, FAMILIES[family].weights_class.split(":", 1)[1])
    pipeline_class.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(state),
                                     safe_serialization=True)
    return sum(value.numel() * value.element_size() for value in state.values())


def lora_refs(folders: dict[str, str], adapters) -> tuple:
    """The job's LoraRefs: each (name, weight) of ``adapters``, named by its local folder."""
    from deployments.contract import LoraRef

    return tuple(LoraRef(name, folders[name], None, weight) for name, weight in adapters)


def load_lora_model(family: str, source: str, folders: dict[str, str], compiled: bool, sources):
    """``family``'s replica with the adapters of ``folders`` configured, in LORA_SLOTS slots
    padded to their rank, room for 4 images a call; on ``source`` (its own VAE, where it is
    not the run's random-weight model). Returns (deployment, load seconds)."""
    import dataclasses

    from benchmarks.gpu import make_spec
    from deployments.contract import LoraRef

    spec = make_spec(family, sources, compiled, 4)
    changes = {"name": f"bench-lora-{family}", "lora_slots": LORA_SLOTS,
               "loras": tuple(LoraRef(name, folder, None, 1.0) for name, folder in folders.items())}
    if source != sources(family):  # real weights: their own VAE, and their fp16 files if only those
        unet = Path(source) / "unet"
        only_fp16 = not any(f for f in unet.glob("*.safetensors") if ".fp16." not in f.name)
        changes.update(source=source, vae=None, variant="fp16" if only_fp16 else None)
    spec = dataclasses.replace(spec, **changes)
    start = time.perf_counter()
    dep = FAMILIES[family].deployment_class()(spec)
    return dep, time.perf_counter() - start


def lora_call(dep, jobs: list) -> tuple[float, list[int], list]:
    """``jobs`` submitted together (as concurrent requests reach a replica); returns the
    seconds until the last ends, the pipeline calls' image counts, and the images."""
    import asyncio

    import torch

    async def together():
        return await asyncio.gather(*(dep.text_to_image(job) for job in jobs))

    before = len(dep.batcher.stats.batch_sizes)
    start = time.perf_counter()
    results = asyncio.run(together())
    if dep.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, dep.batcher.stats.batch_sizes[before:], [r.output for r in results]


def lora_jobs(case, size, steps: int, folders: dict[str, str], adapters: list, seed0: int) -> list:
    """One one-image job per entry of ``adapters`` ((name, weight) pairs; () for none)."""
    import dataclasses

    from benchmarks.gpu import make_job

    return [dataclasses.replace(make_job(case, 1, size, steps, seed0 + i), loras=lora_refs(folders, pairs))
            for i, pairs in enumerate(adapters)]


def timed_calls(dep, jobs: list, repeats: int, calls: list[int], what: str) -> tuple[list[float], list]:
    """``repeats`` runs of ``jobs`` together, each in the pipeline calls ``calls``."""
    seconds, images = [], []
    for _ in range(repeats):
        took, made, images = lora_call(dep, jobs)
        if sorted(made) != sorted(calls):
            raise RuntimeError(f"{what}: pipeline calls of {made} images, expected {calls}")
        seconds.append(took)
    return seconds, images


def median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def lora_batches(run: Run, family: str) -> None:
    """Phase 4 for one model: build its random LoRAs, load it with them in LORA_SLOTS slots,
    then time four concurrent one-image jobs (adapters a, b, a, b at weight 1): mixed (one
    call of 4) and grouped (the batcher held to one adapter a call, as lora_slots 1 holds it:
    two calls of 2), and for SD 2.1 the same four without adapters and the switches the
    compiled replica makes (phase 5), eager. Each figure is written as it is measured; the
    images of mixed and grouped calls are compared (the same seeds: they should agree)."""
    import numpy as np

    case = lora_cases()[family]
    size, steps = run.size(case), run.steps(case)
    names = LORA_NAMES if family == "sd21" else LORA_NAMES[:2]
    run.free()  # one model at a time
    source, weights = lora_model_source(run, family)
    folders, start, size_bytes = {}, time.perf_counter(), 0
    for index, name in enumerate(names):
        folder = Path(run.lora_tmp.name) / f"{family}-{name}"
        size_bytes = build_random_lora(family, local_model_folder(source), folder, LORA_RANK, seed=index)
        folders[name] = str(folder)
    built_s = time.perf_counter() - start
    dep, load_s = load_lora_model(family, source, folders, False, run.sources)
    run.dep, run.loaded = dep, None  # run.free() frees it; run.model() loads anew
    run.loras[family], run.lora_sources[family] = folders, (source, weights)
    slots = dep.loras.slots
    run.figures.write(4, "lora_setup", f"LoRA, {case.label}: {len(names)} random adapters of rank {LORA_RANK} on "
                      f"{len(slots.layers)} attention projections ({size_bytes / 2**20:.1f} MiB each) built in "
                      f"{built_s:.1f} s; {weights} loaded with {LORA_SLOTS} slots of rank {slots.rank} in {load_s:.1f} s",
                      model=family, weights=weights, rank=LORA_RANK, slots=LORA_SLOTS, slot_rank=slots.rank,
                      layers=len(slots.layers), lora_mib=round(size_bytes / 2**20, 2), build_s=round(built_s, 1),
                      load_s=round(load_s, 1))
    pairs = [(("a", 1.0),), (("b", 1.0),), (("a", 1.0),), (("b", 1.0),)]
    jobs = lora_jobs(case, size, steps, folders, pairs, 0)
    repeats, figures = run.opts.repeats, {}
    warm_up = lora_jobs(case, size, case.few_steps, folders, pairs, 0)

    def write(kind: str, seconds: list[float], how: str, **data) -> None:
        figures[kind] = median(seconds)
        run.figures.write(4, "lora_batch", f"LoRA, {case.label}, 4 one-image jobs, {kind}: {how}: median "
                          f"{median(seconds):.3f} s ({', '.join(f'{s:.3f}' for s in seconds)}), "
                          f"{4 / median(seconds):.2f} images/s", model=family, case=case.key, kind=kind,
                          median_s=round(median(seconds), 4), seconds=[round(s, 4) for s in seconds],
                          images_per_s=round(4 / median(seconds), 3), weights=weights, **data)

    lora_call(dep, warm_up)
    seconds, mixed_images = timed_calls(dep, jobs, repeats, [4], "mixed")
    write("mixed", seconds, "one call of 4 (a, b, a, b)", calls=[4])
    dep.batcher.max_adapters = 1  # grouped: what a replica of lora_slots 1 batches
    try:
        lora_call(dep, warm_up)  # the batch of 2's shapes
        seconds, grouped_images = timed_calls(dep, jobs, repeats, [2, 2], "grouped")
    finally:
        dep.batcher.max_adapters = LORA_SLOTS
    write("grouped", seconds, "two calls of 2 (a, a then b, b)", calls=[2, 2])
    diff = max(int(np.abs(m.astype(np.int16) - g.astype(np.int16)).max())
               for m, g in zip(mixed_images, grouped_images))
    text = (f"LoRA, {case.label}: grouped / mixed = {figures['grouped'] / figures['mixed']:.2f}x the time; "
            f"mixed images against grouped: at most {diff}/255 apart")
    data = {}
    if family == "sd21":
        seconds, _ = timed_calls(dep, lora_jobs(case, size, steps, folders, [()] * 4, 0), repeats, [4], "no adapters")
        write("no adapters", seconds, "one call of 4", calls=[4])
        text += f"; mixed / no adapters = {figures['mixed'] / figures['no adapters']:.2f}x"
        data["mixed_over_none"] = round(figures["mixed"] / figures["no adapters"], 3)
    run.figures.write(4, "lora_mixed_vs_grouped", text, model=family, case=case.key,
                      grouped_over_mixed=round(figures["grouped"] / figures["mixed"], 3), max_diff_255=diff,
                      weights=weights, **data)
    if family == "sd21":
        seconds = time_switches(dep, case, size, steps, folders, run.figures, 4, "eager", run.opts.smoke)
        run.lora_eager_switch_s = median(seconds)


def local_model_folder(source: str) -> str:
    """The pipeline folder of ``source`` (a stand-in's, built on first use)."""
    from deployments.sources import Source, local_path

    return local_path(Source.parse(source))


def time_switches(dep, case, size, steps: int, folders: dict[str, str], figures: Figures, phase: int,
                  label: str, smoke: bool, reference_s: float | None = None) -> list[float]:
    """The LORA_SWITCHES calls (SMOKE_SWITCHES of them with --smoke), one one-image job
    each; a figure per call (a run killed mid-way keeps them), then their median, the
    graphs Dynamo compiled meanwhile (a recompile; 0 eager) and the adapters copied into
    slots."""
    import torch._dynamo.utils as dynamo

    switches = LORA_SWITCHES[:SMOKE_SWITCHES] if smoke else LORA_SWITCHES
    graphs, swaps, seconds = dynamo.counters["stats"]["unique_graphs"], dep.loras.slots.swaps, []
    for index, pairs in enumerate(switches):
        took, made, _ = lora_call(dep, lora_jobs(case, size, steps, folders, [pairs], 100 + index))
        if made != [1]:
            raise RuntimeError(f"switch {index}: pipeline calls of {made} images, expected one of 1")
        seconds.append(took)
        compiled = dynamo.counters["stats"]["unique_graphs"] - graphs
        figures.write(phase, "lora_switch", f"LoRA switch {index + 1}/{len(switches)}, {label}: "
                      + " + ".join(f"{n}@{w:g}" for n, w in pairs) + f": {took:.3f} s, {compiled} graphs compiled so far",
                      model=case.family, mode=label, index=index, adapters=[list(p) for p in pairs],
                      seconds=round(took, 4), graphs_compiled=compiled)
    compiled, copied = dynamo.counters["stats"]["unique_graphs"] - graphs, dep.loras.slots.swaps - swaps
    text = (f"LoRA, {case.label}, {label}: {len(seconds)} adapter and weight switches, one image each: median "
            f"{median(seconds):.3f} s a call ({min(seconds):.3f}-{max(seconds):.3f}); {compiled} graphs compiled "
            f"during them{' (no recompile)' if compiled == 0 else ' -- RECOMPILED'}; {copied} adapters copied into slots")
    data = {}
    if reference_s is not None:
        text += f"; eager {reference_s:.3f} s a call: {label} takes {median(seconds) / reference_s:.2f}x eager's time"
        data["eager_median_s"] = round(reference_s, 4)
    figures.write(phase, "lora_switches", text, model=case.family, case=case.key, mode=label,
                  median_s=round(median(seconds), 4), seconds=[round(s, 4) for s in seconds], recompiles=compiled,
                  swaps=copied, **data)
    return seconds


def lora_compiled(run: Run) -> None:
    """Phase 5: the SD 2.1 LoRA replica compiled, in a process of its own killed at what is
    left of the budget (its figures go to the same file): phase 4's adapters and weights."""
    run.free()
    if "sd21" not in run.loras:
        raise RuntimeError("no LoRAs built: phase 4's SD 2.1 step did not run")
    left = run.deadline - time.time()
    if left < MIN_CAP_S:
        run.figures.write(5, "compile", f"compiled LoRA replica: not started, {left:.0f} s left in the budget",
                          variant="lora", status="no time")
        return
    source, weights = run.lora_sources["sd21"]
    setup = {"source": source, "weights": weights, "folders": run.loras["sd21"],
             "eager_s": run.lora_eager_switch_s, "deadline": time.time() + left}
    argv = [sys.executable, "-m", "benchmarks.gpu_run", "--lora-compiled", json.dumps(setup),
            "--figures", str(run.figures.path.resolve()), "--t0", repr(run.t0), "--repeats", str(run.opts.repeats),
            "--built", json.dumps(run.sources.built)] + (["--smoke"] if run.opts.smoke else [])
    run_capped(run.figures, "compiled LoRA replica", argv, left)


def run_lora_compiled(opts) -> int:
    """The compiled LoRA replica's own process: SD 2.1 with phase 4's adapters in slots,
    compiled in LORA_COMPILE_MODE; the first call (an adapter: the graph with every slot on)
    compiles; then LORA_SWITCHES, counting recompiles; then, if the cap leaves time for a
    second compile, a call without adapters (the other graph: slots off)."""
    from benchmarks import common
    import deployments.runtime.loading as loading
    from benchmarks.gpu import Sources, bench_device

    setup = json.loads(opts.lora_compiled)
    loading.COMPILE_OPTIONS = {**loading.COMPILE_OPTIONS, "mode": LORA_COMPILE_MODE}
    device = bench_device(opts.smoke)
    common.quiet()
    figures = Figures(opts.figures, opts.t0)
    case = lora_cases()["sd21"]
    size = case.smoke_size if opts.smoke else case.size
    steps = case.few_steps if opts.smoke else case.steps
    folders = setup["folders"]
    dep, load_s = load_lora_model("sd21", setup["source"], folders, True,
                                  Sources(opts.smoke, device, built=json.loads(opts.built)))
    compiled = device == "cuda"  # load_pipeline compiles on CUDA only
    label = f"compiled (mode {LORA_COMPILE_MODE})" if compiled else "compile asked, eager on the CPU"
    figures.write(5, "variant_loaded", f"LoRA replica, {case.label}, {label}: {setup['weights']} loaded with "
                  f"{LORA_SLOTS} slots in {load_s:.1f} s", variant="lora", load_s=round(load_s, 1),
                  options=loading.COMPILE_OPTIONS if compiled else None)
    first, made, _ = lora_call(dep, lora_jobs(case, size, steps, folders, [(("a", 1.0),)], 99))
    figures.write(5, "compile", f"LoRA replica, {case.label}, {label}: compile + first call (adapter a, "
                  f"{steps} steps) {first:.1f} s", variant="lora", status="compiled",
                  compile_and_first_call_s=round(first, 2))
    time_switches(dep, case, size, steps, folders, figures, 5, label, opts.smoke, setup.get("eager_s"))
    if time.time() + first + 10 < setup["deadline"]:
        import torch._dynamo.utils as dynamo

        graphs = dynamo.counters["stats"]["unique_graphs"]
        took, _, _ = lora_call(dep, lora_jobs(case, size, steps, folders, [()], 200))
        again, _, _ = lora_call(dep, lora_jobs(case, size, steps, folders, [()], 201))
        figures.write(5, "lora_no_adapters", f"LoRA replica, {case.label}, {label}: the first call without "
                      f"adapters (slots off: the second graph) {took:.1f} s, "
                      f"{dynamo.counters['stats']['unique_graphs'] - graphs} graphs compiled; the next {again:.3f} s",
                      variant="lora", first_s=round(took, 2), next_s=round(again, 4),
                      graphs_compiled=dynamo.counters["stats"]["unique_graphs"] - graphs)
    from benchmarks.gpu import free_model

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
    parser.add_argument("--no-loras", action="store_true",
                        help="leave out the LoRA figures (phase 4, and the compiled LoRA replica of phase 5): "
                        "the SDXL variant of the replicas' compile options takes their time")
    # A compiled variant's own process (phase 5), started by the run.
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--figures", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--built", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--lora-compiled", help=argparse.SUPPRESS)  # the compiled LoRA replica's process
    opts = parser.parse_args(argv)
    if opts.plan:
        steps = make_plan(opts)
        print(format_plan(steps, opts.budget))
        return 0 if sum(step.planned_s for step in steps) <= opts.budget else 1
    if opts.variant:
        return run_variant(opts)
    if opts.lora_compiled:
        return run_lora_compiled(opts)

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
