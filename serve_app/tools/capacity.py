"""GPU memory capacity of a Serve config: does every replica fit its share of a GPU?

``serve-app capacity CONFIG [--gpu-memory 24GiB]`` (or ``python3 -m serve_app.tools.capacity``).
For every application and every deployment that loads weights (each model and the safety
checker), it builds the model's real architecture empty (accelerate's ``init_empty_weights``:
parameters on the ``meta`` device) from the configuration files committed in
``deployments/model_configs/`` (no weights, no download), counts its bytes with accelerate's
``compute_module_sizes``, adds an estimate of the activation peak at the deployment's
largest batch and size, and compares the total with the replica's share of a GPU
(``num_gpus`` x GPU memory). The GPU memory comes from ``--gpu-memory`` or the config's
``gpu: {name, memory}``.

Weights (counted, not estimated)
    A pipeline family is the real-size pipeline that the stand-ins build from the real
    configs (``deployments.standins.tiny.pipeline_from_real_configs(name, shrink=False)``),
    built empty; every ``nn.Module`` component (UNet, VAE, text encoders) counted in the
    deployment's dtype (integer buffers in their own), as diffusers counts components for a
    ``device_map``. Whatever the source (Hub, local folder, stand-in), a family is its real
    architecture. A ``vae:`` override counts that VAE instead of the pipeline's; a
    ``preview_decoder`` adds TAESD / TAESDXL; one-model folders (those, the safety checker)
    are built by their class's own loader from the registry's configs (or a local folder's
    ``config.json``); ESRGAN is spandrel's ``ESRGAN(**kwargs)``.

Activation peak (an estimate)
    Kept as formulas of our own: no library estimates the peak of a diffusion call
    (accelerate counts weights only), and these were fitted to, and are tested against, the
    live tensor bytes of the real modules' forward passes (tests/unit/test_capacity.py).
    The phases of a pipeline call run one after another (text encoders, the denoising loop
    with its stream previews, the VAE decode), so the peak is the largest phase, not their
    sum. In step mode (``batching.mode: step``) B is the images of one UNet call and of
    one VAE decode too (the jobs that finish on one step); the others in flight wait between
    two steps with their latents only (not counted: about 1 MB an SDXL image). B is the largest number of images in one pipeline call: ``max(batching.
    max_batch_images, limits.max_n)`` (the batcher always takes a whole job, so one request
    of n images runs as one call of n), with the max_n of the chains a model serves in;
    the safety checker takes the largest max_n of any served name; ESRGAN cuts its input
    into chunks of max_batch_images. Sizes are the largest ``limits.sizes`` or ``limits.max_pixels`` area (and that
    of the chains a model serves in); for upscalers ``limits.max_input_pixels`` in and
    factor^2 x that out. Counts below are tensor elements; bytes = elements x element size.

    UNet (per step), at latent resolution h x w = output pixels / f^2 (f: the VAE's spatial
    factor, 2^(levels-1): 8, and 4 for the x4 upscaler, whose UNet therefore runs at the input
    image's resolution; the x2 latent upscaler's UNet runs at the output's latent size):
        B_unet x [ skips + max_i(work_i) ],   B_unet = 2 B (classifier-free guidance doubles
        the batch of every diffusion family: requests may set guidance_scale > 1)
        skips  = C_0 T_0 (conv_in) + sum_i (layers_i C_i T_i + C_i T_(i+1))  (the down path's
                 outputs, held for the up path)
        work_i = 11 C_i T_i for a level of resnets only, 22 C_i T_i for a level with
                 transformer blocks (the up path's resnets on concatenated skips, and the
                 GEGLU feed-forward's 8 C projection); attention goes through SDPA (flash /
                 memory-efficient kernels), so there is no tokens^2 matrix
        C_i = block_out_channels[i], T_i = h w / 4^i.
    VAE decode, at output resolution H x W (pixels):
        B_vae x (3 x C_full x A + 3 H W),   C_full = block_out_channels[1] (the channels
        entering the full-resolution up block: 256 for SD/SDXL and the x4 VAE): the upsampled
        map, the block's GroupNorm/SiLU output and its conv output are alive at once; 3 H W
        is the RGB output
        B_vae = 1 with vae_slicing, else B
        A = H W; with vae_tiling, tiles of sample_size^2 pixels (the VAE config's sample_size,
            with 25% overlap): A = min(H W, sample_size^2), and 6 H W (instead of 3 H W) for
            the decoded tiles and the blended output
        in float32 when the pipeline honours ``force_upcast`` (SDXL base, refiner, x4
        upscaler), the VAE's config has force_upcast (true when absent) and the dtype is
        float16 (a fp16-fixed ``vae:`` override has force_upcast false); the upcast VAE's
        weights are then float32 too: + params x (4 - dtype bytes). SD 2.1's and the x2
        latent upscaler's pipelines decode in the model's dtype.
    Stream previews (TAESD/TAESDXL, between steps, one image at a time): 3 x decoder
        channels (64) x H x W.
    Text encoders: B_unet x 77 tokens x hidden x 16 (small).
    ESRGAN, at output resolution: B x (2 num_filters + 6) x H_out x W_out (the upsampled
        feature map and its conv output, in the dtype).
    Safety checker (CLIP ViT-L/14 at 224 px): B x tokens x hidden x 20.
    Every activation figure is multiplied by ALLOCATOR_MARGIN (1.2, a guess, not measured):
    the terms above count live tensors only; PyTorch's caching allocator rounds and
    fragments, and cuDNN convolutions take workspace. The constants were fitted by running
    the real modules' forward passes on the meta device while counting the bytes of live
    tensors (SDPA as a fused kernel; tests/unit/test_capacity.py does it again): before the
    margin the formula is 1-5% above that count for the SD 2.1, SDXL, refiner and x4 UNets,
    ~28% above for the x2 upscaler's K-blocks, equal for an untiled VAE decode and ~5% above
    for a tiled one. It is a count of tensors, not a CUDA measurement.
    Image encoding (image-to-image, inpaint, the x2 upscaler's image input) is left out: its
    full-resolution block has block_out_channels[0] channels, half the decoder's.

Per replica
    total = CUDA_CONTEXT (0.5 GiB: the CUDA context, cuBLAS/cuDNN handles and kernels of a
    process on CUDA 12 with lazy loading; an estimate) + weights + activation peak. With
    ``cpu_offload`` (diffusers model offload: one component on the GPU at a time) the weights
    term is the component of the peak phase (the UNet during denoising, the VAE while
    decoding), plus the preview decoder, which stays on the GPU. The caching allocator keeps
    a process's peak reserved, so the peak, not the idle footprint, is what replicas sharing
    a GPU must leave each other.

Over-committed (exit 1) when, with the GPU memory known:
    - a GPU replica's total exceeds its share, num_gpus x GPU memory;
    - the config runs on one GPU (``proxy_location: HeadOnly``, or the sum of num_gpus x
      max replicas is at most 1) and the totals of all replicas (max replicas each) exceed
      the GPU memory;
    and, known or not, when a one-GPU config's num_gpus x max replicas sum to more than 1.
    Deployments with num_gpus 0 run on CPU: listed, not counted.

One module, over 400 lines: the estimate's per-component arithmetic and its report are one
calculation.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from deployments.families import FAMILIES, SAFETY_CHECKER, component_for, family_of_source, load_attribute
from deployments.sources import LOCAL, Source, local_path

GiB = 2**30
# The CUDA context of one replica process: ~300-500 MiB for the context and loaded kernels on
# CUDA 12 (lazy module loading), plus cuBLAS/cuDNN handles and workspace. An estimate.
CUDA_CONTEXT_BYTES = GiB // 2
# Live tensors -> memory the caching allocator holds (rounding, fragmentation, cuDNN workspace).
ALLOCATOR_MARGIN = 1.2
_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
# Pipelines that decode in float32 when the VAE's config says force_upcast (diffusers 0.42:
# StableDiffusionXL*Pipeline and StableDiffusionUpscalePipeline call upcast_vae();
# StableDiffusionPipeline and StableDiffusionLatentUpscalePipeline do not).
UPCASTING_PIPELINES = frozenset({
    "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline", "StableDiffusionUpscalePipeline",
})
PROMPT_TOKENS = 77

# Published fp16 weight sizes (decimal GB) to compare the counted figures with, from the
# family registry.
PUBLISHED_FP16_GB = {name: f.published_fp16_gb for name, f in FAMILIES.items()
                     if f.published_fp16_gb is not None}


# ---------------------------------------------------------------------------------------
# Weights: real architectures on the meta device


@dataclass(frozen=True)
class Component:
    """One module of a model: its class, config and bytes per dtype."""

    name: str
    cls: str
    config: dict[str, Any]
    sizes: dict[str, int]  # dtype -> bytes (accelerate's compute_module_sizes)

    def nbytes(self, dtype: str) -> int:
        return self.sizes[dtype]


@contextlib.contextmanager
def _quiet():
    """Silence the loaders' warnings about configs written by older versions."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _config_of(module) -> dict[str, Any]:
    config = module.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers | diffusers


def _count(name: str, module, config: dict[str, Any] | None = None) -> Component:
    """The bytes of an (empty) module in each dtype: floating parameters and buffers in that
    dtype, integer ones in their own (accelerate's ``compute_module_sizes``)."""
    import torch
    from accelerate.utils import compute_module_sizes

    # compute_module_sizes counts a tensor at the smaller of its own and the asked size: start
    # from float32 (a config's torch_dtype float16 builds some text encoders in float16).
    with _quiet():  # diffusers warns of modules kept in float32 on a cast: none here
        module = module.to(torch.float32)
    sizes = {dtype: int(compute_module_sizes(module, dtype=dtype)[""]) for dtype in _BYTES}
    return Component(name, type(module).__name__,
                     _config_of(module) if config is None else config, sizes)


@lru_cache(maxsize=None)
def family_pipeline(family: str) -> tuple[tuple[Component, ...], str]:
    """(module components, pipeline class name) of a registered pipeline family at its real
    size, built empty by the stand-ins' builder from the committed real configs."""
    import torch
    from accelerate import init_empty_weights

    from deployments.standins.tiny import pipeline_from_real_configs

    with _quiet(), init_empty_weights():
        pipe = pipeline_from_real_configs(family, shrink=False)
    components = tuple(_count(name, module) for name, module in sorted(pipe.components.items())
                       if isinstance(module, torch.nn.Module))
    return components, type(pipe).__name__


@lru_cache(maxsize=None)
def model_component(folder: str, weights_class: str) -> Component:
    """A one-model folder (``config.json``) built empty by ``"module:Class"``'s own loader:
    diffusers' ``load_config`` + ``from_config``, or transformers' config class."""
    from accelerate import init_empty_weights

    cls = load_attribute(weights_class)
    with _quiet(), init_empty_weights():
        if hasattr(cls, "load_config"):  # diffusers
            module = cls.from_config(cls.load_config(folder))
        else:  # transformers
            module = cls(cls.config_class.from_pretrained(folder))
    return _count(Path(folder).name, module)


@lru_cache(maxsize=None)
def single_file_component(folder: str) -> Component:
    """A spandrel net described by ``config.json`` (``architecture`` + ``spandrel_kwargs``)."""
    from accelerate import init_empty_weights

    config = _read_json(Path(folder) / "config.json")
    arch = config["architecture"]
    cls = getattr(importlib.import_module(f"spandrel.architectures.{arch}"), arch)
    with init_empty_weights():
        module = cls(**config["spandrel_kwargs"])
    return _count(arch, module, config)


def _local_config_folder(source: Source) -> str | None:
    """A local folder source holding a ``config.json``, else None."""
    if source.kind != LOCAL:
        return None
    folder = Path(local_path(source))
    return str(folder) if (folder / "config.json").is_file() else None


def _override_folder(source: Source) -> str | None:
    """The config folder describing a component source (a ``vae:`` or ``preview_decoder:``):
    a registered source's family folder, or a local folder holding a config.json; None when
    unknown (another Hub id)."""
    known = family_of_source(source)
    if known is not None:
        return str(known.config_folder)
    return _local_config_folder(source)


# ---------------------------------------------------------------------------------------
# Activation formulas (see the module docstring)


def unet_activation_elements(config: dict[str, Any], tokens: float) -> float:
    """Live elements of one UNet forward per batch entry at ``tokens`` = h x w latents."""
    channels = config["block_out_channels"]
    levels = len(channels)
    layers = config["layers_per_block"]
    layers = [layers] * levels if isinstance(layers, int) else list(layers)
    down = ["CrossAttn" in kind for kind in config["down_block_types"]]
    up = list(reversed(["CrossAttn" in kind for kind in config["up_block_types"]]))
    sizes = [tokens / 4**i for i in range(levels)]
    skips = channels[0] * sizes[0] + sum(
        layers[i] * channels[i] * sizes[i] + (channels[i] * sizes[i + 1] if i < levels - 1 else 0)
        for i in range(levels)
    )
    work = max(channels[i] * sizes[i] * (22 if down[i] or up[i] else 11) for i in range(levels))
    return skips + work


def vae_spatial_factor(vae_config: dict[str, Any]) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def vae_decode_bytes(vae_config: dict[str, Any], pixels: float, batch: int, element_bytes: int,
                     tiling: bool, slicing: bool) -> float:
    """Live bytes of decoding ``batch`` images of ``pixels`` output pixels."""
    channels = vae_config["block_out_channels"]
    full = channels[1] if len(channels) > 1 else channels[0]
    tile = vae_config.get("sample_size") or 512
    tile = tile[0] if isinstance(tile, (list, tuple)) else tile
    images = 1 if slicing else batch
    if tiling and pixels > tile * tile:
        elements = 3 * full * tile * tile + 6 * pixels
    else:
        elements = 3 * full * pixels + 3 * pixels  # + the RGB output
    return images * elements * element_bytes


def preview_decode_bytes(taesd_config: dict[str, Any], pixels: float, batch: int,
                         element_bytes: int) -> float:
    return batch * 3 * taesd_config["decoder_block_out_channels"][-1] * pixels * element_bytes


def text_encoder_bytes(config: dict[str, Any], batch: int, element_bytes: int) -> float:
    hidden = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size", 768)
    return batch * PROMPT_TOKENS * hidden * 16 * element_bytes


# ---------------------------------------------------------------------------------------
# Per deployment


@dataclass
class Estimate:
    """The memory of one deployment's replica."""

    name: str
    family: str
    dtype: str
    num_gpus: float
    replicas: int
    batch: int  # largest images per pipeline call
    size: str  # largest size, as shown
    weights: int  # all weights in dtype
    components: dict[str, int] = field(default_factory=dict)  # bytes per component
    # phase -> (GPU-resident weight bytes during it, activation bytes with the margin)
    phases: dict[str, tuple[int, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cpu_offload: bool = False

    @property
    def on_gpu(self) -> bool:
        return self.num_gpus > 0

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: self.phases[p][0] + self.phases[p][1]
                   if self.cpu_offload else self.phases[p][1])

    @property
    def activation(self) -> int:
        return self.phases[self.peak_phase][1]

    @property
    def resident_weights(self) -> int:
        """Weight bytes on the GPU at the peak."""
        return self.phases[self.peak_phase][0] if self.cpu_offload else self.weights

    @property
    def context(self) -> int:
        return CUDA_CONTEXT_BYTES

    @property
    def total(self) -> int:
        return self.context + self.resident_weights + self.activation


def _max_replicas(deployment) -> int:
    if deployment.autoscaling_config is not None:
        return int(deployment.autoscaling_config.get("max_replicas", 1))
    return deployment.num_replicas if deployment.num_replicas is not None else 1


def _largest_size(model, app) -> tuple[int, str]:
    """(pixels, label) of the largest output of a generating / refining model: its
    largest named size, or its ``max_pixels`` bound (its chains' too)."""
    from serve_app.protocol.request import parse_size

    limits = [model.limits] + [c.limits for c in app.chains if model.name in (c.base, c.refiner)]
    best = (0, "-")
    for lim in limits:
        for size in lim.sizes:
            width, height = parse_size(size)
            best = max(best, (width * height, size))
        if lim.max_pixels is not None:
            best = max(best, (lim.max_pixels, f"{_mp(lim.max_pixels)} (max_pixels)"))
    return best


def _mp(pixels: float) -> str:
    return f"{pixels / 1e6:.2f}MP"


def estimate_model(model, app) -> Estimate:
    """Weights and activation peak of one model deployment (a ModelConfig of ``app``)."""
    info = model.info
    on_gpu = model.deployment.num_gpus > 0
    dtype = model.dtype if on_gpu else model.cpu_dtype
    nbytes = _BYTES[dtype]
    batch = max([model.batching.max_batch_images, model.limits.max_n]
                + [c.limits.max_n for c in app.chains if model.name in (c.base, c.refiner)])
    estimate = Estimate(model.name, model.family, dtype, model.deployment.num_gpus,
                        _max_replicas(model.deployment), batch, "-", 0,
                        cpu_offload=model.cpu_offload and on_gpu)
    margin = ALLOCATOR_MARGIN
    if model.source.stand_in:
        estimate.notes.append("stand-in source: figures are the real model's")

    if info.layout == "single-file":  # ESRGAN through spandrel
        net = single_file_component(str(info.config_folder))
        estimate.components[net.name] = net.nbytes(dtype)
        estimate.weights = net.nbytes(dtype)
        estimate.batch = model.batching.max_batch_images  # it chunks its input
        pixels_in = model.limits.max_input_pixels or 0
        pixels_out = pixels_in * (info.upscale_factor or 1) ** 2
        estimate.size = f"{_mp(pixels_in)}->{_mp(pixels_out)}"
        filters = net.config["spandrel_kwargs"]["num_filters"]
        act = estimate.batch * (2 * filters + 6) * pixels_out * nbytes
        estimate.phases["net"] = (estimate.weights, int(act * margin))
        return estimate

    built, pipeline_class = family_pipeline(model.family)
    components = {c.name: c for c in built}
    vae = components.get("vae")
    if model.vae is not None and vae is not None:
        vae_folder = _override_folder(model.vae)
        if vae_folder is not None:
            vae = model_component(vae_folder, "diffusers:AutoencoderKL")
            vae = Component("vae", vae.cls, vae.config, vae.sizes)
            components["vae"] = vae
        estimate.notes.append(f"vae: {model.vae}" + ("" if vae_folder else " (unknown: counted as "
                                                          "the pipeline's own VAE)"))
    for component in components.values():
        estimate.components[component.name] = component.nbytes(dtype)
    resident = 0  # stays on the GPU under model offload
    preview = None
    if model.preview_decoder is not None:
        default = component_for("preview-decoder", info.latent_space)
        preview_folder = _override_folder(model.preview_decoder) or str(default.config_folder)
        preview = model_component(preview_folder, "diffusers:AutoencoderTiny")
        estimate.components["preview_decoder"] = preview.nbytes(dtype)
        resident = preview.nbytes(dtype)
    estimate.weights = sum(estimate.components.values())

    factor = vae_spatial_factor(vae.config)
    if info.upscale_factor:
        pixels_in = model.limits.max_input_pixels or 0
        pixels = pixels_in * info.upscale_factor**2
        estimate.size = f"{_mp(pixels_in)}->{_mp(pixels)}"
    else:
        pixels, estimate.size = _largest_size(model, app)
    unet_batch = batch * (2 if info.diffusion else 1)

    # Text encoders, one at a time.
    for name, component in components.items():
        if name.startswith("text_encoder"):
            act = text_encoder_bytes(component.config, unet_batch, nbytes)
            estimate.phases[name] = (component.nbytes(dtype) + resident, int(act * margin))
    # Denoising.
    unet = components["unet"]
    unet_bytes = unet.nbytes(dtype) + resident
    act = unet_batch * unet_activation_elements(unet.config, pixels / factor**2) * nbytes
    estimate.phases["unet"] = (unet_bytes, int(act * margin))
    if preview is not None:
        act = preview_decode_bytes(preview.config, pixels, 1, nbytes)  # one image a step
        estimate.phases["previews"] = (unet_bytes, int(act * margin))
    # VAE decode.
    upcast = (pipeline_class in UPCASTING_PIPELINES and dtype == "float16"
              and vae.config.get("force_upcast", True))
    element = 4 if upcast else nbytes
    if model.batching.mode == "step":
        # Step mode: B images a UNet call (the same 2 B rows) and a decode; the rest of the
        # images in flight wait between two steps with their latents and conditioning only.
        in_flight = model.pipeline_spec().images_in_flight
        estimate.notes.append(f"step mode: {batch} images a UNet call and a decode, up to "
                              f"{in_flight} in flight")
    act = vae_decode_bytes(vae.config, pixels, batch, element, model.vae_tiling, model.vae_slicing)
    vae_weights = vae.nbytes("float32" if upcast else dtype)
    if upcast:
        estimate.notes.append("VAE decodes in float32 (force_upcast)")
        if not estimate.cpu_offload:  # the float32 copy replaces the fp16 one while decoding
            act += vae_weights - vae.nbytes(dtype)
    if model.vae_tiling:
        estimate.notes.append(f"VAE tiles of {vae.config.get('sample_size')}px")
    if model.vae_slicing:
        estimate.notes.append("VAE one image at a time")
    estimate.phases["vae"] = (vae_weights + resident, int(act * margin))
    if estimate.cpu_offload:
        estimate.notes.append("cpu_offload: one component on the GPU at a time")
    return estimate


def estimate_safety(safety, app) -> Estimate:
    info = FAMILIES[SAFETY_CHECKER]
    on_gpu = safety.deployment.num_gpus > 0
    dtype = safety.dtype if on_gpu else safety.cpu_dtype
    folder = _local_config_folder(safety.source) or str(info.config_folder)
    checker = model_component(folder, info.weights_class)
    served_max_n = [m.limits.max_n for m in app.models] + [c.limits.max_n for c in app.chains]
    batch = max([safety.batching.max_batch_images, *served_max_n])
    vision = checker.config["vision_config"]
    side = vision.get("image_size", 224)
    tokens = (side // vision.get("patch_size", 14)) ** 2 + 1
    act = batch * tokens * vision.get("hidden_size", 1024) * 20 * _BYTES[dtype]
    estimate = Estimate("SafetyChecker", SAFETY_CHECKER, dtype, safety.deployment.num_gpus,
                        _max_replicas(safety.deployment), batch, f"{side}x{side}",
                        checker.nbytes(dtype), {"safety_checker": checker.nbytes(dtype)})
    estimate.phases["vision"] = (estimate.weights, int(act * ALLOCATOR_MARGIN))
    return estimate


def estimate_app(app) -> list[Estimate]:
    """One Estimate per deployment that loads weights (models, then the safety checker)."""
    estimates = [estimate_model(model, app) for model in app.models]
    if app.safety is not None:
        estimates.append(estimate_safety(app.safety, app))
    return estimates


# ---------------------------------------------------------------------------------------
# The command


def _gib(value: float) -> str:
    return f"{value / GiB:.2f}"


def format_table(estimates: list[Estimate], gpu_memory: int | None) -> str:
    header = ["deployment", "dtype", "weights", "batch", "size", "peak phase", "act peak",
              "context", "total", "num_gpus", "replicas", "share", "fits"]
    rows = [header]
    for e in estimates:
        share = e.num_gpus * gpu_memory if gpu_memory and e.on_gpu else None
        if not e.on_gpu:
            fits = "cpu"
        elif share is None:
            fits = "?"
        else:
            fits = "yes" if e.total <= share else "NO"
        rows.append([
            e.name, e.dtype, _gib(e.weights) + ("*" if e.cpu_offload else ""), str(e.batch),
            e.size, e.peak_phase, _gib(e.activation),
            _gib(e.context) if e.on_gpu else "-", _gib(e.total) if e.on_gpu else "-",
            f"{e.num_gpus:g}", str(e.replicas), _gib(share) if share is not None else "-", fits,
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 or i in (4, 5) else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_replicas(estimates: list[Estimate], gpu_memory: int | None) -> list[str]:
    """GPU replicas whose peak is over their share of a GPU of ``gpu_memory`` bytes."""
    problems = []
    for e in estimates:
        share = e.num_gpus * (gpu_memory or 0)
        if e.on_gpu and gpu_memory and e.total > share:
            problems.append(
                f"{e.name}: peak {_gib(e.total)} GiB is over its share {_gib(share)} GiB "
                f"(num_gpus {e.num_gpus:g} x {_gib(gpu_memory)} GiB)"
            )
    return problems


def check_one_gpu(estimates: list[Estimate], gpu_memory: int | None) -> list[str]:
    """Replicas that all share one GPU: their num_gpus must sum to at most 1 and their peaks
    to at most its memory."""
    gpu = [e for e in estimates if e.on_gpu]
    problems = []
    shares = sum(e.num_gpus * e.replicas for e in gpu)
    if shares > 1 + 1e-9:
        problems.append(
            f"num_gpus x max replicas sum to {shares:.2f} on one GPU ("
            + ", ".join(f"{e.name} {e.num_gpus:g}x{e.replicas}" for e in gpu) + ")"
        )
    total = sum(e.total * e.replicas for e in gpu)
    if gpu_memory and total > gpu_memory:
        largest = sorted(gpu, key=lambda e: -e.total * e.replicas)[:3]
        problems.append(
            f"all replicas together peak at {_gib(total)} GiB, over the GPU's "
            f"{_gib(gpu_memory)} GiB (largest: "
            + ", ".join(f"{e.name} {_gib(e.total * e.replicas)}" for e in largest) + ")"
        )
    return problems


def capacity_command(config_path: str, gpu_memory: str | None = None) -> int:
    """Print the memory table of every application of a Serve config file; return 1 when a
    GPU is over-committed (or a local source cannot be sized), 0 when everything fits (or
    no GPU memory is known). Raises :class:`~serve_app.config.ConfigError` on a config that
    cannot be read or is invalid, and on a bad ``gpu_memory`` (``serve-app``: exit 2)."""
    from serve_app.config import ConfigError, parse_memory
    from serve_app.tools.weights import apps_of, read_serve_config

    try:
        flag_memory = parse_memory(gpu_memory) if gpu_memory else None
    except ValueError as exc:
        raise ConfigError(f"--gpu-memory: {exc}") from None
    serve_config = read_serve_config(config_path)
    apps = apps_of(serve_config)
    everything: list[Estimate] = []
    memories = []
    problems: list[str] = []
    for name, app in apps:
        try:
            estimates = estimate_app(app)
        except (OSError, json.JSONDecodeError) as exc:  # a local folder's config.json
            print(f"serve-app capacity: application {name!r}: cannot size a source: {exc}",
                  file=sys.stderr)
            return 1
        memory = flag_memory or (app.gpu.memory_bytes if app.gpu else None)
        if memory:
            memories.append(memory)
        gpu_label = (f"{app.gpu.name} " if app.gpu and not flag_memory else "") + (
            f"{_gib(memory)} GiB" if memory else "unknown memory (pass --gpu-memory or set gpu:)")
        print(f"application {name!r} of {config_path}; GPU: {gpu_label}")
        print(format_table(estimates, memory))
        for e in estimates:
            if e.notes:
                print(f"  {e.name}: {'; '.join(e.notes)}")
        print("  weights and totals in GiB; * cpu_offload (total counts the peak phase's "
              "component); act peak includes the x1.2 allocator margin; context is the CUDA "
              "context estimate")
        problems += [f"{name}: {p}" for p in check_replicas(estimates, memory)]
        everything += estimates
    gpu = [e for e in everything if e.on_gpu]
    shares = sum(e.num_gpus * e.replicas for e in gpu)
    one_gpu = serve_config.get("proxy_location") == "HeadOnly" or shares <= 1 + 1e-9
    if one_gpu and gpu:
        memory = min(memories) if memories else None
        total = sum(e.total * e.replicas for e in gpu)
        print(f"one GPU: num_gpus x max replicas sum to {shares:.2f}; replicas peak at "
              f"{_gib(total)} GiB together" + (f" of {_gib(memory)} GiB" if memory else ""))
        problems += check_one_gpu(gpu, memory)
    if problems:
        print("OVER-COMMITTED:")
        for problem in problems:
            print(f"  {problem}")
        sys.stdout.flush()
        print(f"serve-app capacity: {config_path} over-commits its GPU "
              f"({len(problems)} problem{'s' if len(problems) > 1 else ''}, listed above)",
              file=sys.stderr)
        return 1
    print("fits" if memories else "no GPU memory known: nothing checked but num_gpus shares")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python3 -m serve_app.tools.capacity CONFIG [--gpu-memory SIZE]``: ``serve-app
    capacity`` (its exit codes: 2 and one line on stderr for an unreadable or invalid config)."""
    import argparse

    from serve_app.config import ConfigError
    from serve_app.tools.weights import one_line

    parser = argparse.ArgumentParser(prog="python3 -m serve_app.tools.capacity",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("config", help="Serve config file, e.g. configs/local-gpu.yaml")
    parser.add_argument("--gpu-memory", default=None,
                        help="memory of one GPU, e.g. 24GiB (overrides the config's gpu.memory)")
    args = parser.parse_args(argv)
    try:
        return capacity_command(args.config, args.gpu_memory)
    except ConfigError as exc:
        sys.stdout.flush()
        print(f"serve-app capacity: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
