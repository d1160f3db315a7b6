"""Tiny, seeded, random-weight models derived from the real models' own configurations.

A weights source ``tiny:<family>`` is turned into a local folder by :func:`materialize_tiny`:
the components are built here from a fixed seed, written with ``save_pretrained``, and then
loaded by the caller through the same ``from_pretrained`` path as real weights. Nothing here
touches the network.

Every tiny model starts from the real model's configuration files, committed in
``deployments/model_configs/`` (see the family registry), and changes only widths and
depths: the keys in :data:`SHRINK_KEYS`. Everything that changes behaviour (prediction
type, attention upcasting, added embeddings and their number of conditioning values, VAE
scaling factor and upcasting, scheduler settings, pipeline flags such as
``force_zeros_for_empty_prompt``, which text encoders exist, which UNet levels have
attention but for the two highest-resolution ones) is the real one, so a tiny test takes the real
model's code paths. The parity test (tests/unit/test_parity.py) lists every key that differs.

The VAE keeps its spatial factor (8; 4 for the x4 upscaler) so that ``512x512`` asks for a
64x64 latent, exactly as the real model does. VAEs are seeded by their latent space: SD 2.1
and the x2 latent upscaler share one, SDXL base and refiner another, so latents handed to a
model of the other space give other pixels.

One module, over 400 lines: one builder per family, each a few lines over the same
shrinking rules.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

from deployments.families import FAMILIES, SAFETY_CHECKER, family
from deployments.sources import Source, register_source_kind

# Bump when the tiny architectures change, so stale caches are not reused.
TINY_VERSION = "6"

TINY_FAMILIES = tuple(FAMILIES)

_SEED = 0
TINY_WEIGHTS_FILE = "model.pth"
_TEXT_HIDDEN = 32

# The keys a tiny model may change, per configuration class: widths and depths only.
SHRINK_KEYS: dict[str, frozenset[str]] = {
    "UNet2DConditionModel": frozenset({
        "block_out_channels", "layers_per_block", "transformer_layers_per_block",
        "attention_head_dim", "norm_num_groups",
        # Attention leaves the two highest-resolution levels (ATTENTION_FROM_LEVEL): attention
        # over N latent pixels costs N squared, and SDXL's second level at 1024x1024 (4096
        # tokens) took 0.6 s of a 0.8 s step on two cores. Every other level keeps the real
        # block type.
        "down_block_types", "up_block_types",
        # Follow the tiny text encoders' widths (the number of conditioning values stays).
        "cross_attention_dim", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
        "time_cond_proj_dim",
    }),
    "AutoencoderKL": frozenset({
        "block_out_channels", "layers_per_block", "norm_num_groups",
        # The mid-block self-attention over every latent pixel: a depth, and the one
        # layer whose cost grows with the square of the image area.
        "mid_block_add_attention",
    }),
    "AutoencoderTiny": frozenset({
        "block_out_channels", "encoder_block_out_channels", "decoder_block_out_channels", "num_encoder_blocks",
        "num_decoder_blocks",
    }),
    "CLIPTextModel": frozenset({
        "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
        "projection_dim", "vocab_size",
    }),
    "CLIPVisionModel": frozenset({
        "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
        "projection_dim", "image_size", "patch_size",
    }),
    "ESRGAN": frozenset({"num_filters", "num_blocks"}),
    "CLIPImageProcessor": frozenset({"size", "crop_size"}),
}
SHRINK_KEYS["CLIPTextModelWithProjection"] = SHRINK_KEYS["CLIPTextModel"]
# Keys that say who wrote a file, not what the model does.
METADATA_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "architectures", "torch_dtype",
    "dtype", "transformers_version", "_use_default_values", "_commit_hash", "model_type",
    "output_hidden_states", "return_dict", "use_cache",
})


def tiny_cache_root() -> Path:
    """Where built tiny pipelines are kept (``SERVE_APP_TINY_CACHE`` overrides)."""
    env = os.environ.get("SERVE_APP_TINY_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "serve_app" / "tiny"


def read_real_config(folder: str | Path, name: str) -> dict[str, Any]:
    """A committed real configuration file, ``name`` relative to the family's folder."""
    from deployments.families import MODEL_CONFIGS

    return json.loads((MODEL_CONFIGS / folder / name).read_text())


def _seed(key: str) -> None:
    import torch

    torch.manual_seed(zlib.crc32(key.encode()) if key else _SEED)


def _tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    # A byte-pair vocabulary over lowercase letters and a few merges: enough to tokenize
    # any prompt (unknown characters map to <|endoftext|>) and to exercise truncation.
    # As in CLIP's real vocabulary, <|startoftext|> and <|endoftext|> are the last two
    # ids: the real text encoder configs (eos_token_id 2) pool at the highest id.
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab: dict[str, int] = {"!": 0}
    for ch in letters:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=77,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token=pad_token,
    ), len(vocab)


# The first UNet level (0: full resolution) at which a tiny UNet keeps the real model's
# attention blocks: level 2 holds 1/16 of the latent's pixels (1024 tokens at 1024x1024).
ATTENTION_FROM_LEVEL = 2
_WITHOUT_ATTENTION = {"CrossAttnDownBlock2D": "DownBlock2D", "CrossAttnUpBlock2D": "UpBlock2D"}


def _scaled(widths: list[int], base: int) -> list[int]:
    """Widths in the real model's proportions, the first one ``base``."""
    return [max(base, round(w * base / widths[0])) for w in widths]


def shrink_unet(real: dict[str, Any], text_widths: list[int], real_text: list[dict]) -> dict:
    """The real UNet config with tiny widths and depths.

    ``text_widths`` are the tiny text encoders' hidden sizes (their hidden states are
    concatenated into the cross-attention input), ``real_text`` the real encoders' configs.
    """
    config = dict(real)
    k_blocks = real["down_block_types"][0].startswith("K")
    # K-blocks normalise in groups of 32 channels: 32 is the smallest width they take.
    widths = _scaled(list(real["block_out_channels"]), 32 if k_blocks else 8)
    config["block_out_channels"] = widths
    config["layers_per_block"] = 1
    if isinstance(real.get("transformer_layers_per_block"), list):
        config["transformer_layers_per_block"] = [1] * len(widths)
    elif real.get("transformer_layers_per_block") is not None:
        config["transformer_layers_per_block"] = 1
    down, up = list(real["down_block_types"]), list(real["up_block_types"])
    for level in range(min(ATTENTION_FROM_LEVEL, len(down))):
        # Up block -1 - level works at the resolution of down block level.
        down[level] = _WITHOUT_ATTENTION.get(down[level], down[level])
        up[-1 - level] = _WITHOUT_ATTENTION.get(up[-1 - level], up[-1 - level])
    if (down, up) != (real["down_block_types"], real["up_block_types"]):
        config["down_block_types"], config["up_block_types"] = down, up
    heads = real.get("attention_head_dim")
    if k_blocks:
        config["attention_head_dim"] = 8  # K-blocks read it as the width of a head
    elif isinstance(heads, list):
        # Read as a head count (diffusers' legacy naming): heads of 8 channels.
        config["attention_head_dim"] = [max(1, w // 8) for w in widths]
    elif heads is not None:
        config["attention_head_dim"] = max(1, min(widths) // 8)
    if real.get("norm_num_groups") is not None:
        config["norm_num_groups"] = 8
    config["cross_attention_dim"] = sum(text_widths)
    if real.get("addition_time_embed_dim"):
        # SDXL: the pooled projection of the last text encoder plus N size/crop (or
        # aesthetic score) values of addition_time_embed_dim each; N stays the real one.
        pooled = real_text[-1]["projection_dim"]
        values = (real["projection_class_embeddings_input_dim"] - pooled) // real["addition_time_embed_dim"]
        config["addition_time_embed_dim"] = 8
        config["projection_class_embeddings_input_dim"] = values * 8 + text_widths[-1]
    if real.get("time_cond_proj_dim"):
        # x2 latent upscaler: a noise-level embedding plus the pooled text embedding.
        config["time_cond_proj_dim"] = real["time_cond_proj_dim"] - real_text[-1]["hidden_size"] + text_widths[-1]
    return config


def shrink_vae(real: dict[str, Any]) -> dict[str, Any]:
    config = dict(real)
    config["block_out_channels"] = _scaled(list(real["block_out_channels"]), 4)
    config["layers_per_block"] = 1
    config["norm_num_groups"] = 4
    config["mid_block_add_attention"] = False
    return config


def shrink_text_encoder(real: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    config = dict(real)
    config.update(hidden_size=_TEXT_HIDDEN, intermediate_size=37, num_attention_heads=4,
                  num_hidden_layers=2, vocab_size=vocab_size)
    if "projection_dim" in real:
        config["projection_dim"] = _TEXT_HIDDEN
    return config


def _from_config(cls_name: str, config: dict[str, Any], seed_key: str):
    """A diffusers or transformers model of class ``cls_name`` from a config dict."""
    _seed(seed_key)
    if cls_name.startswith("CLIP"):
        import transformers
        from transformers import CLIPTextConfig

        fields = {k: v for k, v in config.items() if k not in ("_name_or_path", "architectures")}
        return getattr(transformers, cls_name)(CLIPTextConfig(**fields)).eval()
    import diffusers

    return getattr(diffusers, cls_name).from_config(config).eval()


def build_tiny_pipeline(name: str):
    """The tiny pipeline of diffusers family ``name`` (not yet saved), built from the real
    ``model_index.json`` and component configs with :data:`SHRINK_KEYS` changed."""
    return pipeline_from_real_configs(name, shrink=True)


def pipeline_from_real_configs(name: str, shrink: bool = True):
    """The pipeline of diffusers family ``name`` with seeded random weights, from the real
    ``model_index.json`` and component configs: shrunk (the tiny model), or at full size
    (``shrink=False``: the real architecture, for benchmarks/gpu.py; build it under
    ``torch.device("cuda")`` or ``"meta"``). The tokenizer is the tiny one either way (no
    real vocabulary is committed); prompts are still padded to the real length."""
    import diffusers
    import inspect

    info = family(name)
    if info.layout != "pipeline":
        raise ValueError(f"unknown tiny family {name!r}: not a diffusers pipeline")
    index = read_real_config(info.real_config, "model_index.json")
    components = {key: value for key, value in index.items() if isinstance(value, list)}
    text_keys = [k for k in ("text_encoder", "text_encoder_2") if components.get(k, [None])[0]]
    real_text = [read_real_config(info.real_config, f"{k}/config.json") for k in text_keys]
    tokenizer, vocab_size = _tokenizer(_pad_token(info.real_config))
    built: dict[str, Any] = {}
    for key, (library, cls_name) in components.items():
        if library is None:
            built[key] = None
        elif key.startswith("tokenizer"):
            built[key] = tokenizer
        elif key.endswith("scheduler"):
            built[key] = getattr(diffusers, cls_name).from_config(
                read_real_config(info.real_config, f"{key}/scheduler_config.json"))
        elif key.startswith("text_encoder"):
            real = read_real_config(info.real_config, f"{key}/config.json")
            config = shrink_text_encoder(real, vocab_size) if shrink else real
            built[key] = _from_config(cls_name, config, key)
        elif key == "unet":
            real = read_real_config(info.real_config, "unet/config.json")
            config = shrink_unet(real, [_TEXT_HIDDEN] * len(real_text), real_text) if shrink else real
            built[key] = _from_config(cls_name, config, "unet")
        elif key == "vae":
            real = read_real_config(info.real_config, "vae/config.json")
            config = shrink_vae(real) if shrink else real
            built[key] = _from_config(cls_name, config, f"vae-{info.latent_space}")
        elif key == "feature_extractor":
            # For a safety checker the tiny pipelines do not carry (requires_safety_checker
            # is false in the real index too).
            from transformers import CLIPImageProcessor

            built[key] = CLIPImageProcessor()
        else:
            raise ValueError(f"{name}: no tiny stand-in for component {key} ({cls_name})")
    pipeline_cls = getattr(diffusers, index["_class_name"])
    # Pipeline flags of the real index (force_zeros_for_empty_prompt, max_noise_level, ...).
    flags = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    if "add_watermarker" in inspect.signature(pipeline_cls.__init__).parameters:
        flags["add_watermarker"] = False  # needs the invisible-watermark package
    return pipeline_cls(**built, **flags)


def _pad_token(folder: str) -> str:
    """The real tokenizer's padding token where its config is committed (SD pads with
    ``<|endoftext|>`` or ``!`` depending on the text encoder)."""
    from deployments.families import MODEL_CONFIGS

    path = MODEL_CONFIGS / folder / "tokenizer" / "tokenizer_config.json"
    if path.is_file():
        pad = json.loads(path.read_text()).get("pad_token", "<|endoftext|>")
        return pad["content"] if isinstance(pad, dict) else pad
    return "<|endoftext|>"


def build_pipeline(name: str, folder: Path) -> None:
    build_tiny_pipeline(name).save_pretrained(folder)


def build_component(name: str, folder: Path) -> None:
    """A single diffusers model (TAESD, TAESDXL, a replacement VAE) into ``folder``."""
    info = family(name)
    real = read_real_config(info.real_config, "config.json")
    cls_name = real["_class_name"]
    if cls_name == "AutoencoderKL":
        config = shrink_vae(real)
    elif cls_name == "AutoencoderTiny":
        config = dict(real)
        for key in ("encoder_block_out_channels", "decoder_block_out_channels"):
            config[key] = [8] * len(real[key])
        for key in ("num_encoder_blocks", "num_decoder_blocks"):
            config[key] = [1] * len(real[key])
    else:
        raise ValueError(f"{name}: no tiny stand-in for {cls_name}")
    # A replacement VAE is seeded as its latent space's VAE: the same weights.
    key = f"vae-{info.latent_space}" if cls_name == "AutoencoderKL" else name
    _from_config(cls_name, config, key).save_pretrained(folder)


def build_esrgan(name: str, folder: Path) -> None:
    """A seeded small Real-ESRGAN x2plus RRDB net (pixel-unshuffle x2) as ``model.pth``:
    the real constructor arguments with fewer filters and blocks."""
    import torch
    from spandrel.architectures.ESRGAN import ESRGAN

    kwargs = dict(read_real_config(family(name).real_config, "config.json")["spandrel_kwargs"])
    kwargs.update(num_filters=8, num_blocks=1)
    _seed("")
    torch.save(ESRGAN(**kwargs).state_dict(), folder / TINY_WEIGHTS_FILE)


def build_safety_checker(name: str, folder: Path) -> None:
    build_tiny_safety_checker(folder)


def tiny_safety_checker_parts():
    """A seeded StableDiffusionSafetyChecker (CLIP vision tower + projection) and the
    CLIPImageProcessor that feeds it: the real configs at 32x32 pixels instead of 224x224."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from deployments.families import MODEL_CONFIGS

    folder = family(SAFETY_CHECKER).real_config
    # Read as transformers reads the real file (its legacy *_config_dict keys included).
    config = CLIPConfig.from_pretrained(MODEL_CONFIGS / folder)
    small = dict(hidden_size=_TEXT_HIDDEN, intermediate_size=37, num_attention_heads=4,
                 num_hidden_layers=2)
    for part in (config.text_config, config.vision_config):
        for key, value in small.items():
            setattr(part, key, value)
    config.vision_config.image_size, config.vision_config.patch_size = 32, 4
    config.projection_dim = 16
    torch.manual_seed(_SEED)
    checker = StableDiffusionSafetyChecker(config).eval()
    processor_config = read_real_config(folder, "preprocessor_config.json")
    processor_config.update(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor_config.pop("feature_extractor_type", None)
    processor = CLIPImageProcessor(**processor_config)
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
    """Write a tiny checker that flags some of tiny SD 2.1's images and passes the others.

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


def _build_atomically(target: Path, build, marker: dict[str, Any]) -> Path:
    """Build into a private temporary folder beside ``target`` and rename it into place,
    so that a reader never sees a half-written folder (several replicas may start at once).
    ``tiny.json`` (``marker``) is written last: its presence marks a complete folder."""
    if (target / "tiny.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        (staging / "tiny.json").write_text(json.dumps(marker))
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


def materialize_tiny(name: str, root: Path | None = None) -> Path:
    """Return a folder holding the tiny model of family ``name``, building it on first use.

    Diffusers families get a pipeline folder (``model_index.json``); ``esrgan`` gets
    ``model.pth``; ``safety-checker`` a model folder laid out like
    CompVis/stable-diffusion-safety-checker (``config.json``, weights,
    ``preprocessor_config.json``); components (TAESD, a replacement VAE) a model folder.

    Several replicas may start at once: each builds into a private temporary folder and
    renames it into place, so a reader never sees a half-written pipeline.
    """
    if name not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {name!r}; known: {', '.join(TINY_FAMILIES)}")
    root = Path(root) if root is not None else tiny_cache_root()
    return _build_atomically(
        root / f"{name}-v{TINY_VERSION}",
        lambda staging: _builder(name)(name, staging),
        {"family": name, "version": TINY_VERSION},
    )


# Tiny LoRA adapters: ``tiny:lora/<family>/<name>``, a seeded random LoRA of the tiny model
# of ``family``, written in diffusers' LoRA format and loaded by ``load_lora_weights`` as a
# real one is. Bump when the recipe below changes (TINY_VERSION bumps rebuild them too).
TINY_LORA_VERSION = "2"
TINY_LORA_RANK = 4
# lora_B is scaled by this at build: with torch's default init alone the delta is faint, and
# with attention from UNet level 2 only (ATTENTION_FROM_LEVEL) an
# image-to-image adapter barely moved the picture (a mean of 0.8 of 255).
TINY_LORA_GAIN = 3.0
# What diffusers' LoRA training scripts target: the UNet's attention projections and the
# CLIP text encoders' attention projections.
TINY_LORA_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TINY_LORA_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# The families whose replicas take LoRA adapters (SD 2.1, SDXL base).
TINY_LORA_FAMILIES = ("sd21", "sdxl")


def parse_tiny_lora(source: str | Source) -> tuple[str, str]:
    """``tiny:lora/<family>/<name>`` -> (family, name); ValueError when malformed."""
    parsed = Source.parse(source)
    lora = parsed.lora if parsed.kind == "tiny" else None
    if lora is None:
        raise ValueError(f"{str(source)!r}: a tiny LoRA source is 'tiny:lora/<family>/<name>' "
                         "(a name of letters, digits, '_' and '-')")
    if lora[0] not in TINY_LORA_FAMILIES:
        raise ValueError(f"{str(source)!r}: no tiny LoRAs of family {lora[0]!r}; known: "
                         f"{', '.join(TINY_LORA_FAMILIES)}")
    return lora


def resolve_tiny_lora(source: str | Source, root: Path | None = None) -> Path:
    """The folder of tiny LoRA ``tiny:lora/<family>/<name>``, building it on first use."""
    return materialize_tiny_lora(*parse_tiny_lora(source), root=root)


def build_tiny_lora(family_name: str, name: str, folder: Path) -> None:
    """Write a seeded random LoRA of tiny ``family_name`` into ``folder`` as diffusers'
    training scripts do: peft adapters on the UNet and the text encoders, their
    ``get_peft_model_state_dict`` converted by ``convert_state_dict_to_diffusers``, saved by
    the pipeline class's ``save_lora_weights`` (``pytorch_lora_weights.safetensors``)."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = build_tiny_pipeline(family_name)
    encoders = [key for key in ("text_encoder", "text_encoder_2") if getattr(pipe, key, None) is not None]
    for key in encoders:
        # transformers builds some encoders in their config's float16: the LoRA is float32.
        getattr(pipe, key).to(torch.float32)
    # init_lora_weights=False keeps torch's random init of both A and B (peft's default
    # zeroes B, an adapter that changes nothing): drawn from this adapter's own seed.
    def config(targets):
        return LoraConfig(r=TINY_LORA_RANK, lora_alpha=TINY_LORA_RANK, init_lora_weights=False,
                          target_modules=list(targets))

    unet_config, text_config = config(TINY_LORA_UNET_TARGETS), config(TINY_LORA_TEXT_TARGETS)
    _seed(f"lora/{family_name}/{name}")
    pipe.unet.add_adapter(unet_config)
    for key in encoders:
        getattr(pipe, key).add_adapter(text_config)
    # No adapter metadata (the peft configs) beside the weights, as the SD LoRA training
    # scripts save them: safetensors writes a metadata map of several keys in a random
    # order, so the file's bytes would change from build to build. Loading reads the rank
    # from the shapes and takes lora_alpha = rank, as configured here.
    def lora_layers(model):
        state = get_peft_model_state_dict(model)
        return convert_state_dict_to_diffusers(
            {key: value * TINY_LORA_GAIN if "lora_B" in key else value for key, value in state.items()})

    layers = {"unet_lora_layers": lora_layers(pipe.unet)}
    for key in encoders:
        layers[f"{key}_lora_layers"] = lora_layers(getattr(pipe, key))
    type(pipe).save_lora_weights(folder, **layers, safe_serialization=True)


def materialize_tiny_lora(family: str, name: str, root: Path | None = None) -> Path:
    """Return the folder of tiny LoRA ``name`` of tiny ``family`` (``sd21``, ``sdxl``),
    building it on first use (built once, seeded from family and name: the same bytes in
    every process and on every machine). Cached beside the tiny models, as
    ``lora-<family>-<name>-v<TINY_VERSION>.<TINY_LORA_VERSION>``, written atomically."""
    family_name, name = parse_tiny_lora(f"tiny:lora/{family}/{name}")
    root = Path(root) if root is not None else tiny_cache_root()
    return _build_atomically(
        root / f"lora-{family_name}-{name}-v{TINY_VERSION}.{TINY_LORA_VERSION}",
        lambda staging: build_tiny_lora(family_name, name, staging),
        {"family": family_name, "lora": name, "version": TINY_VERSION,
         "lora_version": TINY_LORA_VERSION},
    )


def _builder(name: str):
    """How the tiny model of family ``name`` is built: by the layout of its real weights."""
    entry = family(name)
    if name == SAFETY_CHECKER:
        return build_safety_checker
    if entry.layout == "single-file":
        return build_esrgan
    return build_pipeline if entry.layout == "pipeline" else build_component


class TinySourceKind:
    """``tiny:<family>`` and ``tiny:lora/<family>/<name>``: built here, loaded as real weights."""

    def local_path(self, source: Source) -> str:
        if source.lora is not None:
            return str(resolve_tiny_lora(source))
        name = source.rest
        if name not in TINY_FAMILIES:
            raise ValueError(f"unknown tiny family {name!r}; known: {', '.join(TINY_FAMILIES)}")
        folder = materialize_tiny(name)
        # spandrel reads one file, not a folder.
        return str(folder / TINY_WEIGHTS_FILE if FAMILIES[name].layout == "single-file" else folder)

    def model(self, source: Source, family: str) -> None:
        return None  # weights, loaded through the real loaders


SOURCE_KIND = TinySourceKind()
# Installed, the entry point registers it on first use; imported (a checkout that is not
# installed, such as a bare GPU machine's), it registers itself.
register_source_kind("tiny", SOURCE_KIND)
