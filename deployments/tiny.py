"""Tiny, seeded, random-weight pipelines of the real diffusers classes.

A weights source ``tiny:<family>`` is turned into a local folder by :func:`materialize_tiny`:
the components are built here from a fixed seed, written with ``save_pretrained``, and then
loaded by the caller through the same ``from_pretrained`` path as real weights. Nothing here
touches the network.

Shapes keep their real meaning: the VAE downsamples by 8 so that ``512x512`` asks for a
64x64 latent, exactly as Stable Diffusion does. Attention only sits at the lowest UNet
resolution so that a 1024x1024 request stays well under a second per step on a small CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# Bump when the tiny architectures change, so stale caches are not reused.
TINY_VERSION = "2"

TINY_FAMILIES = ("sd21", "sdxl", "sdxl-refiner", "sd-x2-latent-upscaler", "sd-x4-upscaler", "esrgan",
                 "safety-checker", "taesd")

# Families whose weights are one spandrel-loadable file rather than a diffusers folder.
SINGLE_FILE_FAMILIES = ("esrgan",)

_SEED = 0
TINY_WEIGHTS_FILE = "model.pth"
_TEXT_HIDDEN = 32


def tiny_cache_root() -> Path:
    """Where built tiny pipelines are kept (``SERVE_APP_TINY_CACHE`` overrides)."""
    env = os.environ.get("SERVE_APP_TINY_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "serve_app" / "tiny"


def _tokenizer():
    from transformers import CLIPTokenizer

    # A byte-pair vocabulary over lowercase letters and a few merges: enough to tokenize
    # any prompt (unknown characters map to <|endoftext|>) and to exercise truncation.
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for ch in letters:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=77,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    ), len(vocab)


def _text_encoder(vocab_size: int, with_projection: bool, projection_dim: int = _TEXT_HIDDEN):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(_SEED)
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=projection_dim,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _vae(levels: int = 4, scaling_factor: float = 0.18215):
    import torch
    from diffusers import AutoencoderKL

    # Same seed for every family: SD 2.1 and the x2 latent upscaler, and SDXL base and
    # refiner, must share one latent space so latents can move between them.
    torch.manual_seed(_SEED)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # Four levels: a scale factor of 2**3 = 8, as in every Stable Diffusion VAE; the x4
        # upscaler's VAE has three (a factor of 4), as the real one does.
        block_out_channels=(4, 4, 8, 8)[:levels],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        mid_block_add_attention=False,
    ).eval()


def _unet(**extra):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(_SEED)
    kwargs = dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        # Cross-attention only at the lowest resolution (1/4 of the latent side).
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        norm_num_groups=8,
        cross_attention_dim=_TEXT_HIDDEN,
    )
    kwargs.update(extra)
    return UNet2DConditionModel(**kwargs).eval()


def build_tiny_pipeline(family: str):
    """Build the tiny pipeline object for ``family`` (not yet saved)."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )

    if family == "sd21":
        tokenizer, vocab_size = _tokenizer()
        # SD 2.1 is a v-prediction model with a DDIM scheduler; keep that.
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        )
        return StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=_text_encoder(vocab_size, with_projection=False),
            tokenizer=tokenizer,
            unet=_unet(),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if family in ("sdxl", "sdxl-refiner"):
        tokenizer, vocab_size = _tokenizer()
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        )
        text_encoder_2 = _text_encoder(vocab_size, with_projection=True)
        time_dim = 8
        if family == "sdxl":
            # Base: two text encoders, hidden states concatenated (32 + 32), and six
            # size/crop conditioning values plus the pooled projection (6 * 8 + 32).
            unet = _unet(
                addition_embed_type="text_time",
                addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=6 * time_dim + _TEXT_HIDDEN,
                cross_attention_dim=2 * _TEXT_HIDDEN,
            )
            return StableDiffusionXLPipeline(
                vae=_vae(),
                text_encoder=_text_encoder(vocab_size, with_projection=False),
                text_encoder_2=text_encoder_2,
                tokenizer=tokenizer,
                tokenizer_2=tokenizer,
                unet=unet,
                scheduler=scheduler,
                force_zeros_for_empty_prompt=True,
                add_watermarker=False,
            )
        # Refiner: only the second text encoder, and an aesthetic score instead of the
        # target size (5 conditioning values), as in stable-diffusion-xl-refiner-1.0.
        unet = _unet(
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=5 * time_dim + _TEXT_HIDDEN,
            cross_attention_dim=_TEXT_HIDDEN,
        )
        return StableDiffusionXLImg2ImgPipeline(
            vae=_vae(),
            text_encoder=None,
            text_encoder_2=text_encoder_2,
            tokenizer=None,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
            add_watermarker=False,
        )
    if family == "sd-x2-latent-upscaler":
        return _latent_upscaler()
    if family == "taesd":
        return _taesd()
    if family == "sd-x4-upscaler":
        return _x4_upscaler()
    raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")


def _taesd():
    """A tiny AutoencoderTiny (TAESD's architecture, 8 channels a block): stream previews."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(_SEED)
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).eval()


def _latent_upscaler():
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline, UNet2DConditionModel

    tokenizer, vocab_size = _tokenizer()
    torch.manual_seed(_SEED)
    # The k-diffusion UNet of sd-x2-latent-upscaler: noisy latents + 2x-upsampled image
    # latents in (4 + 4), 5 channels out, Fourier time embedding conditioned on the noise
    # level (128) and the pooled text embedding (32). Self-attention only in the last
    # (lowest-resolution) block, as in the real config.
    unet = UNet2DConditionModel(
        act_fn="gelu",
        attention_head_dim=8,
        norm_num_groups=None,
        # K-blocks normalise in groups of 32 channels: 32 is the smallest width they take.
        block_out_channels=(32, 32, 64, 64),
        time_cond_proj_dim=128 + _TEXT_HIDDEN,
        conv_in_kernel=1,
        conv_out_kernel=1,
        cross_attention_dim=_TEXT_HIDDEN,
        down_block_types=(
            "KDownBlock2D",
            "KCrossAttnDownBlock2D",
            "KCrossAttnDownBlock2D",
            "KCrossAttnDownBlock2D",
        ),
        in_channels=8,
        mid_block_type=None,
        only_cross_attention=False,
        out_channels=5,
        resnet_time_scale_shift="scale_shift",
        time_embedding_type="fourier",
        timestep_post_act="gelu",
        up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
        layers_per_block=1,
        sample_size=64,
    ).eval()
    scheduler = EulerDiscreteScheduler(prediction_type="sample", sigma_min=0.0292, sigma_max=14.6146)
    return StableDiffusionLatentUpscalePipeline(
        vae=_vae(),
        text_encoder=_text_encoder(vocab_size, with_projection=False),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )


def _x4_upscaler():
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

    tokenizer, vocab_size = _tokenizer()
    torch.manual_seed(_SEED)
    # The UNet runs at the input's resolution on latents (4) + the noised low-res image
    # (3); the noise level is a class embedding. Attention only at 1/8 of the input side.
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=7,
        out_channels=4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=8,
        use_linear_projection=True,
        norm_num_groups=8,
        cross_attention_dim=_TEXT_HIDDEN,
        num_class_embeds=1000,
    ).eval()
    return StableDiffusionUpscalePipeline(
        vae=_vae(levels=3, scaling_factor=0.08333),
        text_encoder=_text_encoder(vocab_size, with_projection=False),
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02),
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.0001,
            beta_end=0.02,
            clip_sample=False,
            set_alpha_to_one=False,
            prediction_type="v_prediction",
        ),
        max_noise_level=350,
    )


def build_tiny_esrgan(path: Path) -> None:
    """Write a seeded small Real-ESRGAN x2plus-shaped RRDB net (pixel-unshuffle x2) as .pth."""
    import torch
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(_SEED)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2, shuffle_factor=2)
    torch.save(model.state_dict(), path)


def tiny_safety_checker_parts():
    """A seeded StableDiffusionSafetyChecker (CLIP vision tower + projection) and the
    CLIPImageProcessor that feeds it, at 32x32 pixels instead of 224x224."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(_SEED)
    small = dict(hidden_size=_TEXT_HIDDEN, intermediate_size=37, num_attention_heads=4,
                 num_hidden_layers=2)
    config = CLIPConfig(
        text_config=CLIPTextConfig(**small).to_dict(),
        vision_config=CLIPVisionConfig(**small, image_size=32, patch_size=4).to_dict(),
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


def image_embeddings(checker, processor, images) -> torch.Tensor:  # noqa: F821 - imported lazily
    """Unit-length CLIP image embeddings of uint8 images (N, H, W, 3), as the checker sees them."""
    import torch

    pixels = processor(list(images), return_tensors="pt").pixel_values
    with torch.inference_mode():
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
    return torch.nn.functional.normalize(embeds.float())


# What the tiny checker is calibrated on: tiny SD 2.1 images as the tests ask for them.
SAFETY_CALIBRATION = {"prompt": "safety calibration", "size": 256, "steps": 4, "seeds": range(16)}


def build_tiny_safety_checker(path: Path) -> None:
    """Write a tiny checker that flags about half of tiny SD 2.1's images.

    Random weights flag nothing with the real thresholds, so one concept is calibrated:
    its embedding is the direction in which tiny SD 2.1 images differ most, and its
    threshold splits 16 of them (:data:`SAFETY_CALIBRATION`) near the median. The other concepts can never fire. Which
    images get flagged is arbitrary but fixed by the seeds, so every safety code path
    (flag, blur, reject) runs in the tiny profile.
    """
    import numpy as np
    import torch

    checker, processor = tiny_safety_checker_parts()
    pipe = build_tiny_pipeline("sd21")
    pipe.set_progress_bar_config(disable=True)
    cal = SAFETY_CALIBRATION
    with torch.inference_mode():
        images = pipe(
            prompt=[cal["prompt"]] * len(cal["seeds"]), width=cal["size"], height=cal["size"],
            num_inference_steps=cal["steps"], output_type="np",
            generator=[torch.Generator("cpu").manual_seed(s) for s in cal["seeds"]],
        ).images
    embeds = image_embeddings(checker, processor, (np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    mean = torch.nn.functional.normalize(embeds.mean(0), dim=0)
    deviations = embeds - (embeds @ mean)[:, None] * mean
    direction = torch.linalg.svd(deviations, full_matrices=False).Vh[0]
    # The threshold sits in the widest gap between scores near the median, so that no
    # calibration image is a borderline case.
    scores = (embeds @ direction).sort().values.tolist()
    quarter = len(scores) // 4
    split = max(range(quarter + 1, len(scores) - quarter), key=lambda i: scores[i] - scores[i - 1])
    threshold = (scores[split - 1] + scores[split]) / 2
    with torch.no_grad():
        checker.concept_embeds.copy_(direction.expand_as(checker.concept_embeds))
        checker.special_care_embeds.copy_(direction.expand_as(checker.special_care_embeds))
        # A cosine never exceeds 1: only concept 0 can fire.
        checker.concept_embeds_weights.fill_(1.0)
        checker.concept_embeds_weights[0] = threshold
        checker.special_care_embeds_weights.fill_(1.0)
    checker.save_pretrained(path)
    processor.save_pretrained(path)


def materialize_tiny(family: str, root: Path | None = None) -> Path:
    """Return a folder holding the tiny ``family`` model, building it on first use.

    Diffusers families get a pipeline folder (``model_index.json``); ``esrgan`` gets
    ``model.pth``; ``safety-checker`` a model folder laid out like
    CompVis/stable-diffusion-safety-checker (``config.json``, weights,
    ``preprocessor_config.json``).

    Several replicas may start at once: each builds into a private temporary folder and
    renames it into place, so a reader never sees a half-written pipeline.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    root = Path(root) if root is not None else tiny_cache_root()
    target = root / f"{family}-v{TINY_VERSION}"
    if (target / "tiny.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=root))
    try:
        if family in SINGLE_FILE_FAMILIES:
            build_tiny_esrgan(staging / TINY_WEIGHTS_FILE)
        elif family == "safety-checker":
            build_tiny_safety_checker(staging)
        else:
            build_tiny_pipeline(family).save_pretrained(staging)
        # Written last: its presence marks a complete folder.
        (staging / "tiny.json").write_text(json.dumps({"family": family, "version": TINY_VERSION}))
        try:
            os.rename(staging, target)
        except OSError:
            # Another process won the race; its copy is identical (same seed).
            if not (target / "tiny.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
