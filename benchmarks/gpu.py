"""Every served model at full size on a GPU, through the deployment classes: module dtypes,
peak GPU memory against `serve-app capacity`'s estimate, latency and images/s.

    python3 -m benchmarks.gpu [--repeats 3] [--models sdxl,sd21,...] [--no-compile] [--smoke] [--out benchmarks/results]

The targets (H100): SDXL 1024x1024, 30 steps, batch 1 in at most 1.0 s; batched SDXL at
20 steps at least 2.4 images/s.

Models are the real architectures at full size with random weights: every component is
built from the real configuration files committed in ``deployments/model_configs/`` (the
family registry's ``real_config`` folder; the same files and the same component loop as
deployments/standins/tiny.py's tiny builders, without shrinking a width), directly on the GPU, cast
to float16 and written with ``save_pretrained`` to a temporary folder. Each deployment class
(deployments/pipelines/sdxl.py, stable_diffusion.py, x4_upscaler.py, latent_upscaler.py, esrgan.py)
then loads that folder as its ``source`` through the production ``load_pipeline`` path,
called directly (no Ray, no HTTP), with a ``PipelineSpec`` as a replica gets it: float16,
the VAE settings of configs/cluster.yaml (SDXL and the refiner decode with a random-weight
``sdxl-vae-fp16-fix`` VAE, one image at a time; the upscalers decode tile by tile), and
``compile`` off, then on (torch.compile of the UNet, loading.COMPILE_OPTIONS). The prompt
goes through the tiny models' byte-pair tokenizer (no tokenizer files are committed): every
prompt is still padded to 77 tokens, so the text encoders do the real work. Random weights
give noise images (float16 may overflow to NaN in places); the time and memory are the
real model's.

One model is loaded at a time (the refiner stage of the SDXL -> refiner chain runs on the
latents the base stage made, as the chain hands them over between replicas), and each
batch of n images is one job of n seeds: one pipeline call (checked with the batcher's
``batch_sizes``). Per case and batch size (1, 2, 4): one warm-up call (it compiles, with
``compile``), then ``--repeats`` timed calls; the median latency and n / median images/s.

1. Module dtypes: the dtype of the floating-point parameters and buffers of every module
   of every pipeline a deployment holds (``pipe`` and the img2img / inpaint views), after
   construction.
2. Peak GPU memory: ``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``)
   during the largest batch (4) at the case's size, less what was allocated before the
   model was loaded; against ``serve_app.tools.capacity.estimate_model`` for the same settings
   (weights + activation peak, which the measurement corresponds to; its total adds the
   0.5 GiB CUDA context estimate, which the allocator does not see).
3. Latency and images/s: SDXL 1024x1024 30 steps (and 20 steps, for the batched goal);
   SDXL -> refiner 1024x1024, 40 steps, high_noise_frac 0.8 (base to 0.8, refiner from it:
   latency is the sum of the two stages); SD 2.1 768x768 25 steps; the x4 upscaler on
   512x768 inputs (20 steps, noise level 20); the x2 latent upscaler on 1024x1024 images
   (20 steps); ESRGAN x2 on 1024x1024 images. The ESRGAN deployment does not compile
   (``compile`` is read by ``load_pipeline``, which it does not use): no compiled row.

On a GPU machine without Ray (the deployments import Ray only for metrics, which stay off
when Ray is not running; this script stands in a stub for the missing module): install the
wheels that the machine lacks, ``scripts/gpu_wheels.py``'s (diffusers, spandrel, and pydantic
for the capacity estimate: without it the estimate cells read n/a and everything else is
measured), then

    python3 -m benchmarks.gpu                                 # everything, eager then compiled
    python3 -m benchmarks.gpu --no-compile                    # eager only
    python3 -m benchmarks.gpu --models sdxl,sdxl-refiner      # one part at a time

(compiling with max-autotune takes minutes a model: where a command's time is limited, run
the models in parts; a part's report is named after its models, ``gpu-<gpu>-sdxl-...md``; on a
machine whose GPU time is short, benchmarks/gpu_run.py runs these measurements in the order
of their value, within a budget).
A model whose load or call fails (out of memory, a compile error) is reported in a
Failures section and the run goes on; the exit status is then 1.

Writes ``gpu-<gpu name>.md`` (``gpu-cpu-smoke.md`` with ``--smoke``) to ``--out`` and
prints it. ``--smoke`` runs the same code on the tiny models (``tiny:<family>``, as
configs/tiny.yaml) on CPU, at tiny sizes, 2 steps (4 for the chain), batches 1 and 2,
without compile: a check that the script works, not a measurement. Benchmarks measure; the
only checks here make sure each call ran as one pipeline call of its batch.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import os
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import common

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def stand_in_for_ray() -> None:
    """Without Ray installed (a bare GPU machine), a stub ``ray`` module: the deployments
    import ``ray.serve.metrics`` at import time and call ``ray.is_initialized()`` to decide
    whether to export metrics (never, here)."""
    if importlib.util.find_spec("ray") is not None:
        return
    ray = types.ModuleType("ray")
    ray.is_initialized = lambda: False
    serve = types.ModuleType("ray.serve")
    metrics = types.ModuleType("ray.serve.metrics")
    ray.serve, serve.metrics = serve, metrics
    sys.modules.update({"ray": ray, "ray.serve": serve, "ray.serve.metrics": metrics})


stand_in_for_ray()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deployments.contract import PipelineSpec, RefineJob, TextToImageJob, UpscaleJob  # noqa: E402
from deployments.families import FAMILIES, family_of_source  # noqa: E402
from deployments.sources import Source  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, film photograph"
GiB = common.GiB
GOAL_LATENCY_S = 1.0  # H100, SDXL 1024x1024, 30 steps, batch 1
GOAL_IMAGES_PER_S = 2.4  # H100, SDXL 1024x1024, 20 steps, batched


@dataclass(frozen=True)
class Case:
    """One timed workload: a job of ``n`` seeds on one model, at every batch size n."""

    key: str  # the row's name in the report
    label: str
    family: str
    size: tuple[int, int]  # output (text to image) or input (upscalers) width, height
    steps: int
    guidance: float
    kind: str  # text_to_image | chain_base | refine | upscale
    smoke_size: tuple[int, int] = (128, 128)
    # The fewest steps that run every stage (the refiner runs the last 0.2 of them): the
    # steps of a smoke call, and of gpu_run.py's warm-up and peak-memory calls.
    few_steps: int = 2


CASES = [
    Case("sdxl", "SDXL 1024x1024, 30 steps", "sdxl", (1024, 1024), 30, 5.0, "text_to_image"),
    Case("sdxl-20", "SDXL 1024x1024, 20 steps (the batched goal)", "sdxl", (1024, 1024), 20, 5.0,
         "text_to_image"),
    # The base stage of the chain (to 0.8, latents out), then the refiner from 0.8 on them.
    Case("sdxl+refiner", "SDXL -> refiner 1024x1024, 40 steps, high_noise_frac 0.8", "sdxl",
         (1024, 1024), 40, 5.0, "chain_base", few_steps=4),
    Case("sdxl+refiner", "SDXL -> refiner 1024x1024, 40 steps, high_noise_frac 0.8", "sdxl-refiner",
         (1024, 1024), 40, 5.0, "refine", few_steps=4),
    Case("sd21", "SD 2.1 768x768, 25 steps", "sd21", (768, 768), 25, 7.5, "text_to_image"),
    Case("x4-upscaler", "x4 upscaler, 512x768 in (2048x3072 out), 20 steps", "sd-x4-upscaler",
         (512, 768), 20, 7.0, "upscale", smoke_size=(32, 48)),
    Case("x2-latent-upscaler", "x2 latent upscaler, 1024x1024 in (2048x2048 out), 20 steps",
         "sd-x2-latent-upscaler", (1024, 1024), 20, 0.0, "upscale", smoke_size=(64, 64)),
    Case("esrgan", "ESRGAN x2, 1024x1024 in (2048x2048 out)", "esrgan", (1024, 1024), 1, 0.0,
         "upscale", smoke_size=(64, 64), few_steps=1),
]
HIGH_NOISE_FRAC = 0.8
MODELS = list(dict.fromkeys(case.family for case in CASES))  # load order


# ---------------------------------------------------------------------------------------
# Full-size random-weight models from the committed real configs


def build_full_pipeline(name: str, folder: Path, device: str) -> None:
    """The full-size pipeline of diffusers family ``name`` with random weights, written to
    ``folder`` in float16: deployments/standins/tiny.py's builder with nothing shrunk, on ``device``."""
    from deployments.standins.tiny import pipeline_from_real_configs

    with torch.device(device):
        pipe = pipeline_from_real_configs(name, shrink=False)
    pipe.to(torch.float16).save_pretrained(folder)


def build_full_component(name: str, folder: Path, device: str) -> None:
    """A single diffusers model (the fp16-fix VAE) at full size, random weights."""
    from deployments.standins.tiny import _from_config, read_real_config

    config = read_real_config(FAMILIES[name].real_config, "config.json")
    with torch.device(device):
        _from_config(config["_class_name"], config, name).to(torch.float16).save_pretrained(folder)


def build_full_esrgan(name: str, folder: Path, device: str) -> Path:
    """The Real-ESRGAN x2plus RRDB net with the real constructor arguments, random weights,
    as a .pth file spandrel reads."""
    from spandrel.architectures.ESRGAN import ESRGAN

    from deployments.standins.tiny import read_real_config

    kwargs = read_real_config(FAMILIES[name].real_config, "config.json")["spandrel_kwargs"]
    torch.manual_seed(0)
    with torch.device(device):
        net = ESRGAN(**kwargs)
    path = folder / "model.pth"
    torch.save({k: v.half() for k, v in net.state_dict().items()}, path)
    return path


class Sources:
    """Weights sources per family: ``tiny:<family>`` (smoke), or full-size random-weight
    folders built on first use into a temporary folder (removed at exit)."""

    def __init__(self, smoke: bool, device: str, built: dict[str, str] | None = None):
        self.smoke, self.device = smoke, device
        self.built: dict[str, str] = dict(built or {})  # given: folders another process built
        self.build_s: dict[str, float] = {}
        self.tmp = None if smoke else tempfile.TemporaryDirectory(prefix="gpu-bench-")

    def __call__(self, name: str) -> str:
        if self.smoke:
            return f"tiny:{name}"
        if name not in self.built:
            folder = Path(self.tmp.name) / name
            folder.mkdir()
            start = time.perf_counter()
            info = FAMILIES[name]
            if info.layout == "single-file":
                source = build_full_esrgan(name, folder, self.device)
            elif info.layout == "model":
                build_full_component(name, folder, self.device)
                source = folder
            else:
                build_full_pipeline(name, folder, self.device)
                source = folder
            gc.collect()
            if self.device == "cuda":
                torch.cuda.empty_cache()
            self.build_s[name] = time.perf_counter() - start
            print(f"built full-size {name} (random weights) in {self.build_s[name]:.1f} s", flush=True)
            self.built[name] = str(source)
        return self.built[name]


# ---------------------------------------------------------------------------------------
# Specs: as configs/cluster.yaml serves each family


def cluster_model(name: str) -> dict:
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    models = config["applications"][0]["args"]["models"]
    return next(m for m in models if m["family"] == name)


def make_spec(name: str, sources: Sources, compile_: bool, max_batch: int) -> PipelineSpec:
    """A replica's spec: configs/cluster.yaml's dtype and VAE settings (a replacement VAE
    is built as its family's random-weight stand-in), room for the largest batch in one
    call, ``compile`` as asked. No stream-preview decoder: nothing here streams."""
    model = cluster_model(name)
    vae = model.get("vae")
    if vae is not None:
        vae = sources(family_of_source(Source.parse(vae)).name)
    return PipelineSpec(name=f"bench-{name}", family=name, source=sources(name),
                        dtype=model.get("dtype", "float16"), compile=compile_,
                        max_batch_images=max_batch, vae=vae,
                        vae_tiling=bool(model.get("vae_tiling")),
                        vae_slicing=bool(model.get("vae_slicing")))


# ---------------------------------------------------------------------------------------
# Measuring


def module_dtypes(dep) -> dict[str, str]:
    """``holder.component`` -> the dtypes of its floating-point parameters and buffers."""
    holders = {"pipe": dep.pipe}
    for attr in ("img2img", "inpaint", "preview_decoder"):
        if getattr(dep, attr, None) is not None:
            holders[attr] = getattr(dep, attr)
    found = {}
    for holder_name, holder in holders.items():
        if isinstance(holder, torch.nn.Module):
            modules = {"model": holder}
        elif hasattr(holder, "components"):
            modules = {k: v for k, v in holder.components.items() if isinstance(v, torch.nn.Module)}
        else:  # spandrel's ImageModelDescriptor
            modules = {"model": holder.model}
        for name, module in modules.items():
            dtypes = {t.dtype for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()}
            found[f"{holder_name}.{name}"] = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    return found


def make_job(case: Case, n: int, size: tuple[int, int], steps: int, seed0: int):
    seeds = tuple(range(seed0, seed0 + n))
    width, height = size
    if case.kind in ("text_to_image", "chain_base"):
        chain = case.kind == "chain_base"
        return TextToImageJob(prompt=PROMPT, negative_prompt=None, width=width, height=height,
                              num_inference_steps=steps, guidance_scale=case.guidance, seeds=seeds,
                              denoising_end=HIGH_NOISE_FRAC if chain else None, output_latents=chain)
    if case.kind == "refine":
        return RefineJob(prompt=PROMPT, negative_prompt=None, num_inference_steps=steps,
                         guidance_scale=case.guidance, seeds=seeds, denoising_start=HIGH_NOISE_FRAC)
    return UpscaleJob(prompt=PROMPT, negative_prompt=None, num_inference_steps=steps,
                      guidance_scale=case.guidance, seeds=seeds)


def upscale_inputs(n: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """n distinct photo-sized uint8 images (ESRGAN upscales a single image once for all
    seeds: distinct images make it do the work of n)."""
    width, height = size
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


@dataclass
class Timing:
    case: Case
    compiled: bool
    batch: int
    seconds: list[float] = field(default_factory=list)
    peak: int | None = None  # bytes above what was allocated before the model was loaded

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)


@dataclass
class Loaded:
    family: str
    compiled: bool
    load_s: float
    resident: int | None  # bytes allocated by constructing the deployment
    dtypes: dict[str, str]
    spec: PipelineSpec


def run_call(dep, case: Case, n: int, size, steps: int, seed0: int, latents) -> tuple[float, Any]:
    """One call of n images, as one pipeline call; returns (seconds, output)."""
    job = make_job(case, n, size, steps, seed0)
    if case.kind == "refine":
        call = dep.refine(job, latents[n])
    elif case.kind == "upscale":
        call = dep.upscale(job, upscale_inputs(n, size, seed0))
    else:
        call = dep.text_to_image(job)
    before = len(dep.batcher.stats.batch_sizes)
    start = time.perf_counter()
    result = asyncio.run(call)
    if dep.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    calls = dep.batcher.stats.batch_sizes[before:]
    if calls != [n]:
        raise RuntimeError(f"{case.key}: pipeline calls of {calls} images, expected one of {n}")
    return seconds, result.output


def load_model(name: str, compiled: bool, sources: Sources, max_batch: int) -> tuple[Any, Loaded, int]:
    """Construct ``name``'s deployment alone (what earlier models left is freed first) with
    room for ``max_batch`` images a call. Returns the deployment, what loading it cost, and
    the bytes allocated before it (0 on CPU): its peaks are counted above them."""
    cuda = torch.cuda.is_available()
    cls = FAMILIES[name].deployment_class()
    spec = make_spec(name, sources, compiled, max_batch)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    dep = cls(spec)
    load_s = time.perf_counter() - start
    loaded = Loaded(name, compiled, load_s, (torch.cuda.memory_allocated() - base) if cuda else None,
                    module_dtypes(dep), spec)
    return dep, loaded, base


def free_model(dep) -> None:
    """Stop the deployment's pipeline thread and give its GPU memory back."""
    dep.batcher.executor.shutdown(wait=True)
    del dep
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_case(dep, case: Case, n: int, size, steps: int, latents: dict, *, warmup: int, repeats: int,
              warmup_steps: int | None = None, base: int | None = None) -> Timing:
    """``warmup`` untimed calls of n images (of ``warmup_steps``, default ``steps``: they
    compile, with ``compile``), then ``repeats`` timed ones. With ``base`` (bytes, on CUDA):
    the peak GPU memory above it over every call. A chain's base stage leaves its latents
    in ``latents[n]``, the refiner's input, as the chain hands them over."""
    timing = Timing(case, dep.spec.compile, n)
    measure_peak = base is not None and dep.device == "cuda"
    for r in range(warmup + repeats):
        if measure_peak:
            torch.cuda.reset_peak_memory_stats()
        call_steps = steps if r >= warmup or warmup_steps is None else warmup_steps
        seconds, output = run_call(dep, case, n, size, call_steps, 1000 * r, latents)
        if measure_peak:
            timing.peak = max(timing.peak or 0, torch.cuda.max_memory_allocated() - base)
        if r >= warmup:
            timing.seconds.append(seconds)
        if case.kind == "chain_base":
            latents[n] = output
    return timing


def bench_model(name: str, compiled: bool, opts, sources: Sources, latents: dict) -> tuple[Loaded, list[Timing]]:
    """Load ``name``'s deployment alone, time its cases at every batch size, free it."""
    dep, loaded, base = load_model(name, compiled, sources, max(opts.batches))
    timings = []
    for case in (c for c in CASES if c.family == name):
        size = case.smoke_size if opts.smoke else case.size
        steps = case.few_steps if opts.smoke else case.steps
        for n in opts.batches:
            timing = time_case(dep, case, n, size, steps, latents, warmup=opts.warmup, repeats=opts.repeats,
                               base=base if n == max(opts.batches) else None)
            print(f"{case.key} [{name}{', compiled' if compiled else ''}] batch {n}: "
                  f"median {timing.median_s:.3f} s, {n / timing.median_s:.2f} images/s", flush=True)
            timings.append(timing)
    free_model(dep)
    return loaded, timings


def capacity_estimate(spec: PipelineSpec, size: tuple[int, int], max_batch_images: int, max_n: int,
                      smoke: bool):
    """``serve_app.tools.capacity.estimate_model`` for this spec with these batching and
    ``limits.max_n`` settings, at ``size`` (the output, or an upscaler's input; the full
    size): the real model's figures, whatever the source. Its ``batch`` is the most images
    of one call that the settings allow, by capacity's own rule."""
    from serve_app.tools.capacity import estimate_model

    ns = types.SimpleNamespace
    info = FAMILIES[spec.family]
    width, height = size
    upscaler = info.upscale_factor is not None
    model = ns(
        name=spec.name, family=spec.family, info=info, dtype=spec.dtype, cpu_dtype=spec.cpu_dtype,
        deployment=ns(num_gpus=1, num_replicas=1, autoscaling_config=None),
        batching=ns(max_batch_images=max_batch_images, mode=spec.batching_mode), pipeline_spec=lambda: spec,
        limits=ns(max_n=max_n, sizes=[] if upscaler else [f"{width}x{height}"], max_pixels=None,
                  max_input_pixels=width * height if upscaler else None),
        cpu_offload=spec.cpu_offload,
        # The real configs: tiny sources and the built folders both describe the real model.
        source=Source.parse(f"tiny:{spec.family}") if smoke else spec.source,
        vae=(Source.parse(f"tiny:{family_of_source(Source.parse(cluster_model(spec.family)['vae'])).name}")
             if smoke and spec.vae else spec.vae),
        preview_decoder=spec.preview_decoder, vae_tiling=spec.vae_tiling, vae_slicing=spec.vae_slicing,
    )
    return estimate_model(model, ns(chains=[]))


# ---------------------------------------------------------------------------------------
# Report


def tag(compiled: bool) -> str:
    return "compiled" if compiled else "eager"


def report_name(device: str, opts) -> str:
    """``gpu-<gpu name>.md`` for a whole run; a part names its models, ``-eager`` without
    compile, ``-smoke`` in smoke mode."""
    stem = f"gpu-{common.device_slug(device)}"
    if opts.models != MODELS:
        stem += "-" + "-".join(opts.models)
    if opts.no_compile and device == "cuda":
        stem += "-eager"
    return stem + ("-smoke" if opts.smoke else "") + ".md"


def gib(value: int | None) -> str:
    return "n/a (CPU)" if value is None else f"{value / GiB:.2f}"


def write_report(loads: list[Loaded], timings: list[Timing], failures: list[str], opts, device: str,
                 command: str) -> Path:
    smoke = opts.smoke
    compiled_runs = any(t.compiled for t in timings)
    lines = [
        "# Served models on a GPU: dtypes, peak memory, latency" + (" (smoke run, not a measurement)" if smoke else ""),
        "",
        ("Tiny models (`tiny:<family>`) on CPU at tiny sizes: the code path of the full-size "
         "GPU benchmark, not its figures." if smoke else
         "Full-size models with random weights built from deployments/model_configs/, loaded by "
         "the deployment classes (called directly, no Ray) in float16."),
        f"Machine: {common.machine(device)}.",
        f"Command: `{command}`.",
        f"Per case and batch size: {opts.warmup} warm-up call(s), then {opts.repeats} timed; "
        "the median. Each batch of n is one job of n seeds: one pipeline call.",
    ]
    if not compiled_runs:
        lines.append("torch.compile: skipped" + (" (CPU: `load_pipeline` compiles the UNet on CUDA only)"
                                                 if device != "cuda" else " (--no-compile)") + ".")
    lines += ["", "## Module dtypes after construction", "",
              "| model | compile | module | dtypes | replica dtype |", "| --- | --- | --- | --- | --- |"]
    for load in loads:
        expected = str(torch.float16 if device == "cuda" else torch.float32).removeprefix("torch.")
        for module, dtypes in load.dtypes.items():
            lines.append(f"| {load.family} | {'on' if load.compiled else 'off'} | {module} | {dtypes} | {expected} |")

    lines += ["", "## Peak GPU memory at the largest batch", "",
              f"`torch.cuda.max_memory_allocated` during a call of {max(opts.batches)} images at "
              "the case's size, less what was allocated before the model loaded; the estimate is "
              "`serve_app.tools.capacity.estimate_model` for the same spec (the full-size model, "
              "float16) at that batch and size: weights + activation peak (its total adds the "
              f"{0.5:.1f} GiB CUDA context estimate, which the allocator does not count).", "",
              "| model | case | compile | batch | weights loaded (GiB) | measured peak (GiB) | "
              "estimate weights + act. (GiB) | estimate total (GiB) | peak phase | measured / estimate |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_load = {(load.family, load.compiled): load for load in loads}
    for timing in timings:
        if timing.batch != max(opts.batches):
            continue
        load = by_load[(timing.case.family, timing.compiled)]
        try:
            estimate = capacity_estimate(load.spec, timing.case.size, max(opts.batches), max(opts.batches),
                                         smoke)
        except Exception as exc:  # noqa: BLE001 - e.g. the config's pydantic missing on a bare GPU machine
            # The measurements stay; the estimate can be had later with `serve-app capacity`.
            cell = f"n/a ({type(exc).__name__}: {str(exc)[:80]})"
            lines.append(f"| {timing.case.family} | {timing.case.key} | {'on' if timing.compiled else 'off'} | "
                         f"{timing.batch} | {gib(load.resident)} | {gib(timing.peak)} | {cell} | n/a | n/a | n/a |")
            continue
        expected = estimate.resident_weights + estimate.activation
        ratio = "n/a (CPU)" if timing.peak is None else f"{timing.peak / expected:.2f}"
        lines.append(f"| {timing.case.family} | {timing.case.key} | {'on' if timing.compiled else 'off'} | "
                     f"{timing.batch} | {gib(load.resident)} | {gib(timing.peak)} | {expected / GiB:.2f} | "
                     f"{estimate.total / GiB:.2f} | {estimate.peak_phase} | {ratio} |")

    lines += ["", "## Latency and throughput", "",
              "| case | workload | compile | batch | latency median (s) | images/s | stages (s) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    grouped: dict[tuple, list[Timing]] = {}
    for timing in timings:
        grouped.setdefault((timing.case.key, timing.compiled, timing.batch), []).append(timing)
    rows = {}
    for (key, compiled, batch), parts in grouped.items():
        seconds = sum(part.median_s for part in parts)  # the chain: base stage + refiner stage
        stages = " + ".join(f"{part.median_s:.3f}" for part in parts) if len(parts) > 1 else ""
        rows[(key, compiled, batch)] = seconds
        case = parts[0].case
        label = case.label
        if smoke:
            steps = f", {case.few_steps} steps" if FAMILIES[case.family].diffusion else ""
            label += f" (smoke: tiny, {'x'.join(map(str, case.smoke_size))}{steps})"
        lines.append(f"| {key} | {label} | {'on' if compiled else 'off'} | {batch} | {seconds:.3f} | "
                     f"{batch / seconds:.2f} | {stages} |")
    if any(t.case.family == "esrgan" for t in timings) and compiled_runs:
        lines.append("")
        lines.append("ESRGAN: no compiled row; the ESRGAN deployment does not read `compile`.")

    lines += ["", "## Goals (H100)", ""]
    on_h100 = device == "cuda" and "H100" in torch.cuda.get_device_name(0)
    for compiled in sorted({t.compiled for t in timings}):
        tag = "compiled" if compiled else "eager"
        batch1 = rows.get(("sdxl", compiled, 1))
        if batch1 is not None:
            lines.append(f"- SDXL 1024x1024, 30 steps, batch 1 ({tag}): {batch1:.3f} s; goal <= "
                         f"{GOAL_LATENCY_S:.1f} s" + (f": {'met' if batch1 <= GOAL_LATENCY_S else 'not met'}"
                                                      if on_h100 else " (not an H100: not judged)"))
        batched = [(b / s, b) for (k, c, b), s in rows.items() if k == "sdxl-20" and c == compiled and b > 1]
        if batched:
            rate, batch = max(batched)
            lines.append(f"- SDXL 1024x1024, 20 steps, best batched ({tag}, batch {batch}): {rate:.2f} "
                         f"images/s; goal >= {GOAL_IMAGES_PER_S:.1f}" + (
                             f": {'met' if rate >= GOAL_IMAGES_PER_S else 'not met'}"
                             if on_h100 else " (not an H100: not judged)"))
    if failures:
        lines += ["", "## Failures", ""] + [f"- {failure}" for failure in failures]
    lines += ["", "## Loading", "", "| model | compile | construct (s) |", "| --- | --- | --- |"]
    lines += [f"| {load.family} | {'on' if load.compiled else 'off'} | {load.load_s:.1f} |" for load in loads]
    return common.write_lines(opts.out, report_name(device, opts), lines)


def bench_device(smoke: bool) -> str:
    """``cuda`` where there is one, else ``cpu``. ``--smoke`` runs on the CPU, every core for
    torch, with CUDA hidden from the deployments (select_device then picks the CPU, as on a
    CPU machine)."""
    if not smoke:
        return "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    if torch.cuda.is_available():
        print("--smoke runs on CPU; CUDA is not used", flush=True)
        torch.cuda.is_available = lambda: False
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case and batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (compiles)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"families to run, in order (default: all: {','.join(MODELS)}); "
                             "sdxl-refiner needs sdxl before it")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models on CPU, tiny sizes, batches 1 and 2: checks the script runs")
    args = sys.argv[1:] if argv is None else argv
    opts = parser.parse_args(args)
    models = opts.models = [m.strip() for m in opts.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    if "sdxl-refiner" in models and "sdxl" not in models[:models.index("sdxl-refiner")]:
        parser.error("sdxl-refiner refines the latents of sdxl: list sdxl before it")
    opts.batches = (1, 2, 4)
    if opts.smoke:
        opts.batches, opts.repeats, opts.warmup = (1, 2), 1, 1
    device = bench_device(opts.smoke)
    common.quiet()
    sources = Sources(opts.smoke, device)
    variants = [False] + ([True] if device == "cuda" and not opts.no_compile else [])
    loads, timings, failures = [], [], []
    for compiled in variants:
        latents: dict[int, Any] = {}
        for name in models:
            if compiled and FAMILIES[name].layout == "single-file":
                continue  # ESRGAN: its deployment does not compile
            if name == "sdxl-refiner" and not latents:
                failures.append(f"sdxl-refiner ({tag(compiled)}): skipped, no latents from sdxl")
                continue
            try:
                load, done = bench_model(name, compiled, opts, sources, latents)
            except Exception as exc:  # noqa: BLE001 - reported, and the other models still run
                traceback.print_exc()
                failures.append(f"{name} ({tag(compiled)}): {type(exc).__name__}: {str(exc)[:300]}")
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            loads.append(load)
            timings += done
    command = shlex.join(["python3", "-m", "benchmarks.gpu", *args])
    report = write_report(loads, timings, failures, opts, device, command)
    print(report.read_text())
    print(f"written to {report}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
