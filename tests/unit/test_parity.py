"""Tiny models cannot drift from the real ones: every configuration key of every tiny
component is the real model's (deployments/model_configs/), but for the widths and depths
that deployments/standins/tiny.py may shrink (SHRINK_KEYS). A failure lists every key that differs."""

import json

import pytest

from deployments.families import FAMILIES, MODEL_CONFIGS
from deployments.standins.tiny import METADATA_KEYS, SHRINK_KEYS, materialize_tiny


def effective_config(cls_name: str, config: dict) -> dict:
    """A config with the class's defaults filled in, as the model sees it (built on the
    meta device: no memory for the real model's weights)."""
    import torch

    if cls_name.startswith("CLIP") and cls_name.endswith("Model") or cls_name.endswith("Projection"):
        from transformers import CLIPTextConfig

        return CLIPTextConfig(**config).to_dict()
    import diffusers

    cls = getattr(diffusers, cls_name)
    if cls_name.endswith("Scheduler"):
        return dict(cls.from_config(config).config)
    with torch.device("meta"):
        return dict(cls.from_config(config).config)


def _absent(value) -> bool:
    return value is None or value == [None, None]  # an optional component left out


def differing_keys(real: dict, tiny: dict) -> dict[str, tuple]:
    keys = (set(real) | set(tiny)) - METADATA_KEYS
    return {k: (real.get(k), tiny.get(k)) for k in sorted(keys)
            if not k.startswith("_") and real.get(k) != tiny.get(k)
            and not (_absent(real.get(k)) and _absent(tiny.get(k)))}


def diffusers_folders():
    for name, info in FAMILIES.items():
        if info.layout == "pipeline":
            yield name


@pytest.mark.parametrize("name", list(diffusers_folders()))
def test_tiny_pipeline_matches_its_real_config(name):
    info = FAMILIES[name]
    real_dir, tiny_dir = MODEL_CONFIGS / info.real_config, materialize_tiny(name)
    real_index = json.loads((real_dir / "model_index.json").read_text())
    tiny_index = json.loads((tiny_dir / "model_index.json").read_text())
    problems = []
    # The pipeline class, its components' classes and its flags are the real ones.
    index_diff = differing_keys(real_index, tiny_index)
    index_diff.pop("add_watermarker", None)  # needs a package we do not install; None = off
    problems += [f"model_index.json {k}: real {r!r}, tiny {t!r}" for k, (r, t) in index_diff.items()]
    assert real_index["_class_name"] == tiny_index["_class_name"]
    for component, (library, cls_name) in ((k, v) for k, v in real_index.items()
                                           if isinstance(v, list) and v[0] is not None):
        if component.startswith("tokenizer") or component == "feature_extractor":
            continue  # a tiny vocabulary; its special tokens are the real ones
        file = "scheduler_config.json" if component.endswith("scheduler") else "config.json"
        real = effective_config(cls_name, json.loads((real_dir / component / file).read_text()))
        tiny = effective_config(cls_name, json.loads((tiny_dir / component / file).read_text()))
        allowed = SHRINK_KEYS.get(cls_name, frozenset())
        for key, (r, t) in differing_keys(real, tiny).items():
            if key not in allowed:
                problems.append(f"{component}/{file} {key}: real {r!r}, tiny {t!r}")
    assert not problems, f"{name}: tiny differs from the real model in:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", ["taesd", "taesdxl", "sdxl-vae-fp16-fix"])
def test_tiny_components_match_their_real_config(name):
    real = json.loads((FAMILIES[name].config_folder / "config.json").read_text())
    tiny = json.loads((materialize_tiny(name) / "config.json").read_text())
    cls_name = real["_class_name"]
    diff = differing_keys(effective_config(cls_name, real), effective_config(cls_name, tiny))
    assert set(diff) <= SHRINK_KEYS[cls_name], diff


def test_tiny_safety_checker_matches_its_real_config():
    from transformers import CLIPConfig, CLIPImageProcessor

    folder = FAMILIES["safety-checker"].config_folder
    tiny_dir = materialize_tiny("safety-checker")
    real = CLIPConfig.from_pretrained(folder).to_dict()
    tiny = CLIPConfig.from_pretrained(tiny_dir).to_dict()
    problems = []
    for part in ("vision_config", "text_config"):
        for key, (r, t) in differing_keys(real[part], tiny[part]).items():
            if key not in SHRINK_KEYS["CLIPVisionModel"]:
                problems.append(f"{part}.{key}: real {r!r}, tiny {t!r}")
    top = {k: v for k, v in differing_keys(real, tiny).items()
           if k not in ("vision_config", "text_config", "projection_dim")}
    problems += [f"{k}: real {r!r}, tiny {t!r}" for k, (r, t) in top.items()]
    real_proc = CLIPImageProcessor.from_pretrained(folder).to_dict()
    tiny_proc = CLIPImageProcessor.from_pretrained(tiny_dir).to_dict()
    for key, (r, t) in differing_keys(real_proc, tiny_proc).items():
        if key not in SHRINK_KEYS["CLIPImageProcessor"] | {"image_processor_type", "processor_class"}:
            problems.append(f"preprocessor {key}: real {r!r}, tiny {t!r}")
    assert not problems, "\n".join(problems)


def test_tiny_esrgan_matches_its_real_config():
    import torch
    from spandrel import ModelLoader

    from deployments.standins.tiny import TINY_WEIGHTS_FILE

    real = json.loads((FAMILIES["esrgan"].config_folder / "config.json").read_text())
    model = ModelLoader().load_from_file(materialize_tiny("esrgan") / TINY_WEIGHTS_FILE)
    descriptor = real["spandrel_descriptor"]
    assert (model.architecture.name, model.scale, model.input_channels, model.output_channels) == (
        real["architecture"], descriptor["scale"], descriptor["input_channels"],
        descriptor["output_channels"])
    assert "unshuffle" in model.tags and (model.supports_half, model.supports_bfloat16) == (
        descriptor["supports_half"], descriptor["supports_bfloat16"])
    assert isinstance(model.model, torch.nn.Module)


def test_shrink_keys_are_widths_and_depths():
    # What behaviour hangs on must never be listed as shrinkable.
    behaviour = {"prediction_type", "upcast_attention", "requires_aesthetics_score",
                 "force_zeros_for_empty_prompt", "addition_embed_type", "scaling_factor",
                 "force_upcast", "use_linear_projection", "timestep_spacing", "beta_schedule",
                 "hidden_act", "latent_channels", "in_channels", "out_channels", "sample_size",
                 "num_class_embeds", "max_noise_level", "scale", "shuffle_factor"}
    for cls_name, keys in SHRINK_KEYS.items():
        assert not keys & behaviour, (cls_name, keys & behaviour)


def test_behaviour_keys_are_the_real_ones():
    """Spot checks of the behaviour keys, read from the built tiny pipelines."""
    from deployments.standins.tiny import build_tiny_pipeline

    sd = build_tiny_pipeline("sd21")
    assert sd.scheduler.config.prediction_type == "v_prediction"
    assert sd.unet.config.upcast_attention is True
    xl, refiner = build_tiny_pipeline("sdxl"), build_tiny_pipeline("sdxl-refiner")
    assert xl.config.force_zeros_for_empty_prompt is True
    assert refiner.config.requires_aesthetics_score is True
    assert refiner.text_encoder is None and xl.text_encoder is not None
    assert xl.vae.config.scaling_factor == refiner.vae.config.scaling_factor == 0.13025
    assert xl.vae.config.force_upcast is True
    assert sd.vae.config.scaling_factor == 0.18215
    # SDXL base conditions on 6 size/crop values, the refiner on 5 (aesthetic score).
    for pipe, values in ((xl, 6), (refiner, 5)):
        unet = pipe.unet.config
        assert unet.projection_class_embeddings_input_dim == (
            values * unet.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim)
