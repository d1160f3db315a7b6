"""``sim:<family>``: a simulated accelerator, for benchmarks only.

A replica whose source is ``sim:<family>`` is the family's own deployment class, with its
batcher, cancellation, step callbacks, previews and chains, whose pipeline is a
:class:`SimPipeline`: each call sleeps (no CPU used, the GIL released) for the time the
cost model below gives an H100 for that call, calling the step callbacks between steps,
and returns deterministic photo-like images of the right size (PNG cost depends on
content: noise would make every encode slow, flat colour every encode fast). It measures
what the serving layer costs at GPU speed on a machine without a GPU. It is not a model:
never serve it to users, and never read its images as results.

The cost model (H100 SXM, fp16, PyTorch with SDPA). Per denoising step, for a batch of
``n`` images of ``P`` pixels, classifier-free guidance included::

    step(n, P) = fixed + per_image * n * P / reference_pixels

plus, per pipeline call, the text encoders, and per image the VAE decode (which scales
with output pixels). ``fixed`` and ``per_image`` are shaped by published batch-scaling
figures (A100) and scaled so that batch 1 at the reference size matches a published H100
end-to-end latency. The figures, with their sources:

- [A] diffusers docs, "Accelerated PyTorch 2.0 support" (optimization/torch2.0), A100,
  iterations/s at batch 1 / 4 / 16: SDXL 1024x1024 8.64 / 2.44 / 0.64; SD 1.5 512x512
  with torch.compile 49.74 / 17.27 / 4.68.
  https://huggingface.co/docs/diffusers/optimization/torch2.0
- [B] stabilityai/stable-diffusion-xl-1.0-tensorrt model card: H100, 1024x1024, batch 1,
  30 steps, 2496 ms for the non-optimized (PyTorch) pipeline; with TensorRT, CLIP text
  encoders 4.70 ms and VAE decode 127 ms.
  https://huggingface.co/stabilityai/stable-diffusion-xl-1.0-tensorrt
- [C] alexeigor/sd-benchmarks README: SD 2.1 768x768, 50 steps, batch 1, H100-SXM with
  PyTorch 2 + compile: 1.39 s. https://github.com/alexeigor/sd-benchmarks
- [D] dbolya/tomesd issue 21: SD x4 upscaler, A100 fp16, batch 1, input 128x128: 3.33 s,
  256x256: 7.95 s (VAE decode included; 75 steps taken: the pipeline's default, the
  issue does not say).
  https://github.com/dbolya/tomesd/issues/21
- [E] the same [C] README: H100-SXM / A100-SXM with PyTorch 2 + compile, 1.64 to 1.70x
  (SD 1.5 and SD 2.1): A100 figures are divided by 1.67 where no H100 figure exists.

Where nothing is published (the SDXL refiner, the x2 latent upscaler, Real-ESRGAN, the
safety checker) the entry says what it assumes; these are estimates, not fits.

**LoRA rows.** The SD 2.1 and SDXL UNets are the real ``UNet2DConditionModel`` built from
the real config on PyTorch's ``meta`` device (no memory, no compute), so a replica's
``LoraCache`` puts its slots in it with peft exactly as on a GPU, and copies adapters into
them; the sim's adapters (``sim:lora/<family>/r<rank>[-<label>]``) are state dicts of meta
tensors at the real layers' shapes (the attention projections, as diffusers' training
scripts target) that ``pipe.lora_state_dict`` returns. A UNet call then costs, besides the
base model's time, every active slot's LoRA terms for every row (a row that does not use a
slot still multiplies by it, at weight 0): ``2 x (lora_A + lora_B weights)`` multiply-adds
a token per layer, times the layer's tokens (its block's latent positions; the encoder's 77
for cross-attention keys and values), charged at the base UNet's own rate: its per-image
step time over its FLOPs per row at the reference size (``unet_flops_per_row``, counted with
``torch.utils.flop_counter`` on the real config, meta device: :func:`count_unet_flops`).
FLOPs at the base model's efficiency: on a GPU, LoRA's thin matmuls run below it (kernel
launches, memory-bound), so this is the lower bound of their cost.

One module, over 400 lines: the cost model's table and its sources make up most of it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

import numpy as np

from deployments.families import FAMILIES, SAFETY_CHECKER
from deployments.sources import Source, register_source_kind
from deployments.standins.tiny import read_real_config

A100_TO_H100 = 1.67  # [E]
MP = 1024 * 1024  # a "megapixel" here: one 1024x1024 image


@dataclass(frozen=True)
class CostModel:
    """Seconds an H100 takes, per family: see the module's docstring for the sources."""

    # Per denoising step: fixed + per_image * images * pixels / reference_pixels (ms).
    step_fixed_ms: float
    step_per_image_ms: float
    reference_pixels: int
    text_ms: float = 0.0  # text encoders, per pipeline call
    decode_ms_per_mp: float = 0.0  # VAE decode, per output image and megapixel (MP)
    # Pixels the denoiser runs at, per output pixel: 1 for SD/SDXL; 1/16 for the x4
    # upscaler (it denoises the input); 1/4 for the x2 latent upscaler.
    denoise_scale: float = 1.0
    # The UNet's FLOPs for one row at reference_pixels (the families that take LoRAs): the
    # rate LoRA terms are charged at (lora_s).
    unet_flops_per_row: float = 0.0

    def step_s(self, images: int, pixels: int) -> float:
        ms = self.step_fixed_ms + self.step_per_image_ms * images * pixels / self.reference_pixels
        return ms / 1000

    def unet_s(self, rows: int, pixels: int) -> float:
        """One UNet call of ``rows`` rows: a guided image is two rows (``step_s`` counts
        guidance in), so the fixed part is paid once a call, the rest by rows."""
        return self.step_s(rows / 2, pixels)

    def lora_s(self, rows: int, flops_per_row: float) -> float:
        """LoRA terms of one UNet call: ``rows`` rows of ``flops_per_row`` each, at the base
        UNet's own rate (its per-image step time over its FLOPs per image, two rows, at the
        reference size)."""
        if not flops_per_row:
            return 0.0
        return rows * flops_per_row * self.step_per_image_ms / (2 * self.unet_flops_per_row) / 1000

    def decode_s(self, images: int, pixels: int) -> float:
        return self.decode_ms_per_mp * images * pixels / MP / 1000

    def call_s(self, images: int, out_pixels: int, steps: int, decode: bool = True) -> float:
        """One pipeline call: text encoders, ``steps`` denoising steps, decode."""
        pixels = int(out_pixels * self.denoise_scale)
        return (self.text_ms / 1000 + steps * self.step_s(images, pixels)
                + (self.decode_s(images, out_pixels) if decode else 0.0))

    def best_rate(self, steps: int, out_pixels: int, max_images: int) -> float:
        """Images/s at the best batch size up to ``max_images``: the capacity a
        benchmark compares served throughput against."""
        return max(n / self.call_s(n, out_pixels, steps) for n in range(1, max_images + 1))


def _fit(a100_its: tuple[tuple[int, float], tuple[int, float]], h100_batch1_step_ms: float
         ) -> tuple[float, float]:
    """(fixed, per_image) ms per step: the line through two A100 (batch, it/s) points [A],
    scaled so that batch 1 takes ``h100_batch1_step_ms``."""
    (n1, its1), (n2, its2) = a100_its
    t1, t2 = 1000 / its1, 1000 / its2
    per_image = (t2 - t1) / (n2 - n1)
    fixed = t1 - per_image * n1
    scale = h100_batch1_step_ms / (fixed + per_image)
    return fixed * scale, per_image * scale


SDXL_DECODE_MS_PER_MP = 127.0  # [B], 1024x1024 = 1 MP
SDXL_TEXT_MS = 4.7  # [B]
# SDXL, batch 1, 30 steps in 2496 ms [B], less its text encoders and decode.
_SDXL_STEP_MS = (2496 - SDXL_TEXT_MS - SDXL_DECODE_MS_PER_MP) / 30
_SDXL_STEP = _fit(((4, 2.44), (16, 0.64)), _SDXL_STEP_MS)
# SD 2.1 768x768, batch 1, 50 steps in 1.39 s [C], less its decode (the same VAE
# architecture as SDXL's, by pixels) and text encoder (taken as SDXL's); batch shape from
# SD 1.5 at 512x512 [A] (a UNet of the same size), its per-image part scaled to 768x768.
_SD21_PIXELS = 768 * 768
_SD21_STEP_MS = (1390 - SDXL_TEXT_MS - SDXL_DECODE_MS_PER_MP * _SD21_PIXELS / MP) / 50
_sd15_fixed, _sd15_per_image = _fit(((4, 17.27), (16, 4.68)), 1000 / 49.74)
_sd21_scale = _SD21_STEP_MS / (_sd15_fixed + _sd15_per_image * _SD21_PIXELS / (512 * 512))
_SD21_STEP = (_sd15_fixed * _sd21_scale, _sd15_per_image * _SD21_PIXELS / (512 * 512) * _sd21_scale)
# x4 upscaler: the line through [D]'s two points (per step, by input pixels, decode
# included), divided by [E].
_X4_PER_IMAGE = (7950 - 3330) / 75 / (256 * 256 - 128 * 128) * (256 * 256)  # ms at 256x256 in
_X4_FIXED = 3330 / 75 - _X4_PER_IMAGE * (128 * 128) / (256 * 256)

# One UNet row's FLOPs at the reference size: count_unet_flops("sdxl", 1024, 1024) and
# count_unet_flops("sd21", 768, 768) (torch 2.14, diffusers 0.42; the real configs).
SDXL_UNET_FLOPS = 6.76123639808e12
SD21_UNET_FLOPS = 2.14910574592e12

COSTS: dict[str, CostModel] = {
    "sdxl": CostModel(*_SDXL_STEP, MP, SDXL_TEXT_MS, SDXL_DECODE_MS_PER_MP,
                      unet_flops_per_row=SDXL_UNET_FLOPS),
    # Assumed: the refiner's UNet (2.3B parameters) costs the base's (2.6B) per step in
    # proportion; one text encoder of the base's two. Nothing published.
    "sdxl-refiner": CostModel(_SDXL_STEP[0] * 2.3 / 2.6, _SDXL_STEP[1] * 2.3 / 2.6, MP,
                              SDXL_TEXT_MS / 2, SDXL_DECODE_MS_PER_MP),
    "sd21": CostModel(*_SD21_STEP, _SD21_PIXELS, SDXL_TEXT_MS, SDXL_DECODE_MS_PER_MP,
                      unet_flops_per_row=SD21_UNET_FLOPS),
    # Assumed: the x2 latent upscaler's UNet costs SD 2.1's per step at its working size
    # (latents at twice the input's size, i.e. the output's); nothing published.
    "sd-x2-latent-upscaler": CostModel(*_SD21_STEP, _SD21_PIXELS, SDXL_TEXT_MS,
                                       SDXL_DECODE_MS_PER_MP),
    "sd-x4-upscaler": CostModel(_X4_FIXED / A100_TO_H100, _X4_PER_IMAGE / A100_TO_H100, 256 * 256,
                                0.0, 0.0, denoise_scale=1 / 16),
    # Assumed from the arithmetic: Real-ESRGAN x2plus (23 RRDB blocks at half the input's
    # size) is about 9 TFLOP for a 1024x1024 input, run at about 100 TFLOP/s of fp16
    # convolutions: 90 ms per megapixel of input (a quarter of the output's pixels).
    "esrgan": CostModel(0.0, 0.0, MP, decode_ms_per_mp=90.0 / 4),
    # Assumed: CLIP ViT-L/14 at 224x224 (about 80 GFLOP an image): 1 ms fixed + 1 ms per
    # image, whatever the image size (the processor resizes on the CPU first).
    SAFETY_CHECKER: CostModel(1.0, 1.0, 1),
}


# ---------------------------------------------------------------------------------------
# Photo-like images
# ---------------------------------------------------------------------------------------

@lru_cache(maxsize=16)
def photo_like(width: int, height: int) -> np.ndarray:
    """A deterministic (height, width, 3) float32 image in [0, 1] with the statistics of a
    photo: smooth regions at several scales, a few sharp edges, and sensor grain. Its PNG
    is about as large as a real 1024x1024 photo's (1.7 MB at zlib level 6)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(width * 100003 + height)
    longest = max(width, height)
    out = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((3, 0.55), (9, 0.25), (40, 0.12), (160, 0.06)):
        grid = rng.random((max(2, cells * height // longest), max(2, cells * width // longest), 3))
        for c in range(3):
            layer = Image.fromarray(grid[..., c].astype(np.float32)).resize(
                (width, height), Image.Resampling.BICUBIC)
            out[..., c] += amplitude * np.asarray(layer)
    out = (out - out.min()) / max(float(out.max() - out.min()), 1e-6)
    shapes = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(shapes)
    for _ in range(6):  # hard-edged objects over the soft background
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(longest // 16, longest // 5))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.integers(40, 255)))
    mask = np.asarray(shapes, np.float32)[..., None] / 255
    out = out * (1 - 0.5 * mask) + 0.5 * mask * rng.random(3).astype(np.float32)
    out += rng.normal(0, 0.012, out.shape).astype(np.float32)
    return np.clip(out, 0, 1)


@lru_cache(maxsize=8)
def _variants(width: int, height: int) -> tuple[np.ndarray, ...]:
    """The size's photo in 8 variants (flipped, colours turned), uint8, made once per size:
    a call then costs what a GPU replica's host pays for its images, a copy."""
    base = (photo_like(width, height) * 255).round().astype(np.uint8)
    return tuple(np.ascontiguousarray(base[:: -1 if v & 1 else 1, :: -1 if v & 2 else 1,
                                           ::-1 if v & 4 else 1]) for v in range(8))


def sim_images(width: int, height: int, seeds: list[int]) -> np.ndarray:
    """uint8 (N, H, W, 3), one image per seed (the seed picks one of 8 variants): what a
    ``sim:`` pipeline returns, and what benchmarks/sim.py's floor app returns beside it."""
    variants = _variants(width, height)
    return np.stack([variants[seed % 8] for seed in seeds])


def _as_output(images: np.ndarray, output_type: str):
    """A pipeline's ``output_type="pt"`` output of uint8 (N, H, W, 3) images: a (N, 3, H, W)
    view of uint8, what the device-side conversion of a GPU replica hands the host
    (deployments/runtime/arrays.py ``pixels_to_uint8``), so the host's CPU does what it does behind
    a GPU. The deployments ask for nothing else."""
    import torch

    if output_type != "pt":
        raise ValueError(f"the simulated pipeline returns output_type 'pt' or 'latent', not {output_type!r}")
    return torch.from_numpy(images).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------


def _real_config(family: str, name: str) -> dict[str, Any]:
    """The family's committed real config file ``name``, or {} where the family has none."""
    entry = FAMILIES[family]
    return read_real_config(entry.real_config, name) if (entry.config_folder / name).exists() else {}


class _Config(dict):
    """A loaded config with attribute access, as diffusers' FrozenDict gives."""

    __getattr__ = dict.get


class _Images(SimpleNamespace):
    images: Any


def _seeds(generator) -> list[int]:
    if generator is None:
        return [0]
    generators = generator if isinstance(generator, list) else [generator]
    return [g.initial_seed() for g in generators]


class _SimDevice:
    """The simulated accelerator's clock, shared by a pipeline, its UNet and every view of
    them (step mode: deployments/runtime/steploop.py)."""

    def __init__(self):
        self.charged_s = 0.0  # model seconds charged so far (what tests compare with the cost model)
        # How many times faster than the modelled accelerator the clock runs: a benchmark
        # sets it to fit more jobs in its minutes, and scales what it measures back.
        self.speed = 1.0

    def sleep(self, seconds: float, deadline: float) -> float:
        """Sleep until ``deadline + seconds / speed`` (absolute, so waking late does not add up)."""
        self.charged_s += seconds
        deadline += seconds / self.speed
        remaining = deadline - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        return deadline


def _unet_call(unet, sample, return_dict: bool):
    """A UNet call on the simulated accelerator: sleep for its rows and size (and its LoRA
    terms), and return its input as the prediction: no tensor work (CPU threads spinning
    after a parallel op would take the CPU that the serving layer is measured on)."""
    rows, _, height, width = sample.shape
    pixels = int(height * width * unet.vae_scale_factor ** 2 * unet.cost.denoise_scale)
    seconds = unet.cost.unet_s(rows, pixels) + unet.cost.lora_s(rows, unet.lora_flops_per_row(height, width))
    unet.clock.sleep(seconds, time.perf_counter())
    return (sample,) if not return_dict else SimpleNamespace(sample=sample)


class _SimUNet:
    """The UNet of a family that takes no LoRA: its real config, and a call that sleeps for
    its rows and size."""

    def __init__(self, family: str, clock: _SimDevice, vae_scale_factor: int):
        self.config = _Config(_real_config(family, "unet/config.json"))
        self.cost, self.clock, self.vae_scale_factor = COSTS[family], clock, vae_scale_factor

    def lora_flops_per_row(self, height: int, width: int) -> float:
        return 0.0

    def __call__(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
        return _unet_call(self, sample, return_dict)


# Tokens of the text encoders' output (CLIP's 77): what cross-attention keys and values take.
ENCODER_TOKENS = 77
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.")


def layer_tokens(path: str, blocks: int, height: int, width: int) -> int:
    """Tokens a UNet layer at ``path`` takes per row for latents of ``height`` x ``width``:
    its block's positions (down block ``i`` at 1/2^i of the latents, up block ``i`` at
    1/2^(blocks-1-i), the middle block at the smallest), the encoder's tokens for
    cross-attention keys and values, one for the time and added embeddings. (A down
    block's downsampler runs at the next level: counted at its block's, an overestimate.)"""
    if path.endswith((".attn2.to_k", ".attn2.to_v")):
        return ENCODER_TOKENS
    match = _BLOCK.match(path)
    if match:
        index = int(match.group(2))
        level = index if match.group(1) == "down_blocks" else blocks - 1 - index
    elif path.startswith("mid_block."):
        level = blocks - 1
    else:
        return 1
    return -(-height // 2 ** level) * -(-width // 2 ** level)


def lora_flops_per_row(unet, height: int, width: int) -> float:
    """FLOPs of ``unet``'s active LoRA terms for one row of ``height`` x ``width`` latents:
    per layer and active adapter, 2 x (lora_A + lora_B weights) per token (the weights'
    numbers are the multiply-adds a token: rank x (in + out) for a linear layer) times
    the layer's tokens (:func:`layer_tokens`). 0 with adapters off. Any
    ``UNet2DConditionModel`` with peft LoRA layers."""
    from peft.tuners.lora import LoraLayer

    layers = [(path, module) for path, module in unet.named_modules() if isinstance(module, LoraLayer)]
    if not layers or layers[0][1].disable_adapters:
        return 0.0
    blocks = len(unet.config.block_out_channels)
    total = 0
    for path, layer in layers:
        for name in layer.active_adapters:
            if name in layer.lora_A:
                weights = layer.lora_A[name].weight.numel() + layer.lora_B[name].weight.numel()
                total += 2 * weights * layer_tokens(path, blocks, height, width)
    return float(total)


@lru_cache(maxsize=1)
def _lora_unet_class():
    """The real UNet class with the simulated call (built on first use: diffusers' import)."""
    from diffusers import UNet2DConditionModel

    class SimLoraUNet(UNet2DConditionModel):
        """The family's real UNet on the ``meta`` device (its modules and shapes, no memory),
        so that peft adds LoRA slots to it and copies adapters into them as on a GPU; its
        call sleeps for its rows, its size and its active LoRA terms."""

        def setup(self, family: str, clock: _SimDevice, vae_scale_factor: int) -> None:
            self.cost, self.clock, self.vae_scale_factor = COSTS[family], clock, vae_scale_factor
            self._lora_layers: list | None = None
            self._lora_flops: dict = {}

        def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
            """diffusers' ``add_adapter`` on the meta device (peft puts a model's second
            adapter where it creates it), then the adapter's scalings as CPU tensors: peft
            made them floats, a hot-swap reads the old one (``.item()``), and a meta tensor
            cannot be read (peft's compiled hot-swap preparation keeps tensors as they are)."""
            import torch
            from peft.tuners.lora import LoraLayer

            with torch.device("meta"):
                super().add_adapter(adapter_config, adapter_name=adapter_name)
            for module in self.modules():
                if isinstance(module, LoraLayer) and adapter_name in module.scaling:
                    module.scaling[adapter_name] = torch.tensor(float(module.scaling[adapter_name]))

        def lora_flops_per_row(self, height: int, width: int) -> float:
            from peft.tuners.lora import LoraLayer

            if not getattr(self, "_hf_peft_config_loaded", False):
                return 0.0  # no adapter was ever added: no walk of the modules at every call
            if not self._lora_layers:  # the slots are added once, at start or the first adapter
                self._lora_layers = [module for module in self.modules() if isinstance(module, LoraLayer)]
                if not self._lora_layers:
                    return 0.0
            first = self._lora_layers[0]  # every slot is on the same layers, switched together
            state = (first.disable_adapters, tuple(first.active_adapters), height, width)
            if state not in self._lora_flops:
                self._lora_flops[state] = lora_flops_per_row(self, height, width)
            return self._lora_flops[state]

        def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
            return _unet_call(self, sample, return_dict)

    return SimLoraUNet


def _meta_unet(family: str, clock: _SimDevice, vae_scale_factor: int):
    """The family's real UNet, on the meta device, with the simulated call."""
    import torch

    with torch.device("meta"):
        unet = _lora_unet_class().from_config(_real_config(family, "unet/config.json"))
    unet.requires_grad_(False)
    unet.setup(family, clock, vae_scale_factor)
    return unet


def count_unet_flops(family: str, width: int, height: int) -> int:
    """FLOPs of one row (one image, unguided) of ``family``'s real UNet at ``width`` x
    ``height`` pixels, counted by ``torch.utils.flop_counter`` on the meta device (tens of
    seconds on a CPU): what ``unet_flops_per_row`` in COSTS was set from."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = _real_config(family, "unet/config.json")
    scale = 2 ** (len(_real_config(family, "vae/config.json")["block_out_channels"]) - 1)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        sample = torch.zeros(1, config["in_channels"], height // scale, width // scale)
        context = torch.zeros(1, ENCODER_TOKENS, config["cross_attention_dim"])
        extra = {}
        if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text, size ids
            pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)}
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(sample, torch.tensor(999), encoder_hidden_states=context, **extra)
    return counter.get_total_flops()


class _SimVAE:
    """The VAE: its real config, and a decode that sleeps for its images and size."""

    def __init__(self, family: str, config: dict, device: _SimDevice, vae_scale_factor: int):
        import torch

        self.config = _Config(config)
        self.cost, self.device, self.vae_scale_factor = COSTS[family], device, vae_scale_factor
        self.dtype = torch.float32

    def to(self, *args, **kwargs):
        return self

    def decode(self, z, return_dict=True, generator=None):
        images, _, height, width = z.shape
        self.device.sleep(self.cost.decode_s(images, height * width * self.vae_scale_factor ** 2),
                          time.perf_counter())
        return (z,) if not return_dict else SimpleNamespace(sample=z)


class SimPipeline:
    """Stands in for a family's pipeline (and its img2img / inpaint views): the same call
    arguments, the same outputs' types and shapes, the configuration attributes the
    deployment reads (from the real model's config files), and a sleep for the compute."""

    def __init__(self, family: str):
        self.family = family
        self.cost = COSTS[family]
        self.config = _Config(_real_config(family, "model_index.json"))
        vae = _real_config(family, "vae/config.json")
        self.vae_scale_factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        self.device = _SimDevice()
        if FAMILIES[family].takes_loras:
            self.unet = _meta_unet(family, self.device, self.vae_scale_factor)
        else:
            self.unet = _SimUNet(family, self.device, self.vae_scale_factor)
        self.vae = _SimVAE(family, vae, self.device, self.vae_scale_factor)
        self.latent_channels = vae.get("latent_channels", 4)
        self.image_processor = SimpleNamespace(config=_Config(vae_scale_factor=self.vae_scale_factor))
        self.num_timesteps = 0
        self.scale = FAMILIES[family].upscale_factor or 1  # spandrel's attribute (ESRGAN)

    @property
    def charged_s(self) -> float:
        return self.device.charged_s

    # The pipeline's own conveniences, as the deployments call them.
    def set_progress_bar_config(self, **kwargs) -> None:
        pass

    def to(self, *args, **kwargs):
        return self

    def eval(self):
        return self

    def lora_state_dict(self, source, weight_name=None, return_lora_metadata=False, **kwargs):
        """A sim adapter as diffusers' ``lora_state_dict`` returns a file's: (state dict,
        network alphas[, metadata]); see :func:`sim_lora_state`."""
        state = sim_lora_state(self.family, self.unet, str(source))
        return (state, None, None) if return_lora_metadata else (state, None)

    def _sleep(self, seconds: float, deadline: float) -> float:
        return self.device.sleep(seconds, deadline)

    def _denoise(self, latents, steps: int, guided: bool, on_step) -> None:
        """Text encoders, then ``steps`` UNet calls (through the step loop in step mode:
        ``self.unet`` is then a job view's)."""
        import torch

        self._sleep(self.cost.text_ms / 1000, time.perf_counter())
        self.num_timesteps = steps
        rows = torch.cat([latents] * 2) if guided else latents
        for step in range(steps):
            self.unet(rows, torch.tensor(999 - step), encoder_hidden_states=None, return_dict=False)
            if on_step is not None:
                on_step(step, latents)

    def __call__(self, *args, **kwargs) -> Any:
        if args:  # spandrel's model(tensor): Real-ESRGAN
            return self._upscale_tensor(args[0])
        if "clip_input" in kwargs:  # the safety checker
            return self._check(kwargs["clip_input"], kwargs["images"])
        return self._diffuse(**kwargs)

    def _diffuse(self, prompt=None, generator=None, image=None, mask_image=None, width=None,
                 height=None, num_inference_steps=50, strength=None, denoising_end=None,
                 denoising_start=None, output_type="pil", callback_on_step_end=None,
                 callback=None, callback_steps=1, guidance_scale=7.5, **ignored) -> _Images:
        import torch

        seeds = _seeds(generator)
        count = len(prompt) if isinstance(prompt, list) else len(seeds)
        factor = FAMILIES[self.family].upscale_factor or 1
        if image is not None and factor > 1:  # an upscaler: image (N, H, W, 3) or latents
            if isinstance(image, torch.Tensor):
                height = image.shape[-2] * self.vae_scale_factor * factor
                width = image.shape[-1] * self.vae_scale_factor * factor
            else:
                height, width = image.shape[1] * factor, image.shape[2] * factor
        elif isinstance(image, torch.Tensor):  # the refiner: latents (N, C, h, w)
            height, width = image.shape[-2] * self.vae_scale_factor, image.shape[-1] * self.vae_scale_factor
        elif image is not None and width is None:  # img2img: PIL images
            width, height = image[0].size
        steps = num_inference_steps
        if strength is not None and denoising_start is None and factor == 1:
            steps = min(int(steps * strength), steps)  # diffusers' get_timesteps
        if denoising_start is not None:
            steps -= int(steps * denoising_start)
        if denoising_end is not None:
            steps = int(round(steps * denoising_end))
        shape = (count, self.latent_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        latents = torch.zeros(shape)

        def on_step(step, latents):
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, 999 - step, {"latents": latents})
            elif callback is not None and step % callback_steps == 0:
                callback(step, 999 - step, latents)

        # A guided image is two UNet rows, an unguided one one (the upscalers' costs are fitted
        # with guidance: two rows whatever the job asks).
        guided = guidance_scale > 1 or not FAMILIES[self.family].step_batching
        self._denoise(latents, steps, guided, on_step)
        if output_type == "latent":
            return _Images(images=latents)
        self.vae.decode(latents, return_dict=False)  # (through the step loop in step mode)
        return _Images(images=_as_output(sim_images(width, height, seeds), output_type))

    def _upscale_tensor(self, tensor):
        count, _, height, width = tensor.shape
        self._sleep(self.cost.decode_s(count, height * width * self.scale ** 2), time.perf_counter())
        return _as_output(sim_images(width * self.scale, height * self.scale, list(range(count))), "pt")

    def _check(self, clip_input, images):
        count = len(clip_input)
        self._sleep(self.cost.step_s(count, 1), time.perf_counter())
        return images, [False] * count


_SIM_LORA = re.compile(r"^sim:lora/(?P<family>[^/]+)/r(?P<rank>[0-9]+)(-[A-Za-z0-9_-]+)?$")


def sim_lora_state(family: str, unet: Any, source: str) -> dict:
    """The UNet LoRA ``sim:lora/<family>/r<rank>[-<label>]`` in peft's keys (``unet.<layer>.
    lora_A.weight``): meta tensors of rank ``rank`` on every attention projection of
    ``unet`` (a meta UNet: the shapes are the real model's)."""
    import torch

    from deployments.runtime.lora_slots import ATTENTION_LAYERS  # the layers slots cover by default

    match = _SIM_LORA.match(source)
    if match is None:
        raise ValueError(f"{source!r}: a simulated LoRA is 'sim:lora/<family>/r<rank>[-<label>]'")
    if match.group("family") != family:
        raise ValueError(f"{source!r}: size mismatch: a LoRA of {match.group('family')}, not of {family}")
    rank = int(match.group("rank"))
    state = {}
    for path, module in unet.named_modules():
        layer = getattr(module, "base_layer", module)  # a layer peft has wrapped already
        if path.endswith(ATTENTION_LAYERS) and isinstance(layer, torch.nn.Linear):
            state[f"unet.{path}.lora_A.weight"] = torch.empty(rank, layer.in_features, device="meta")
            state[f"unet.{path}.lora_B.weight"] = torch.empty(layer.out_features, rank, device="meta")
    return state


def load_sim(family: str) -> SimPipeline:
    """The simulated pipeline of ``family`` (``sim:<family>``)."""
    if family not in COSTS:
        raise ValueError(f"no simulated accelerator for {family!r}; known: {', '.join(COSTS)}")
    return SimPipeline(family)


class SimSourceKind:
    """``sim:<family>``: no weights; the family's deployment runs a :class:`SimPipeline`."""

    def local_path(self, source: Source) -> str:
        if source.lora is not None:
            return str(source)  # what SimPipeline.lora_state_dict reads
        raise ValueError(f"{source}: a simulated accelerator has no weights to load")

    def model(self, source: Source, family: str) -> SimPipeline:
        if source.family != family:
            raise ValueError(f"{source} stands in for {source.family}, not for {family}")
        pipe = load_sim(family)
        if family == SAFETY_CHECKER:
            # The safety deployment feeds its checker through the real image processor.
            from transformers import CLIPImageProcessor

            pipe.processor = CLIPImageProcessor.from_pretrained(FAMILIES[family].config_folder)
        return pipe


SOURCE_KIND = SimSourceKind()
# Installed, the entry point registers it on first use; imported (a checkout that is not
# installed, such as a bare GPU machine's), it registers itself.
register_source_kind("sim", SOURCE_KIND)
