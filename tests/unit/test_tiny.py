import threading

import pytest

from deployments.standins.tiny import TINY_WEIGHTS_FILE, build_tiny_pipeline, materialize_tiny

# Sizes keep their meaning: 512 px is a 64-latent, as for the real models; the x4
# upscaler's VAE is a factor of 4, as the real one.
VAE_FACTORS = {"sd21": 8, "sdxl": 8, "sdxl-refiner": 8, "sd-x2-latent-upscaler": 8, "sd-x4-upscaler": 4}


@pytest.mark.parametrize("family", VAE_FACTORS)
def test_tiny_pipelines_save_and_load_through_from_pretrained(tmp_path, family):
    import diffusers

    folder = materialize_tiny(family, root=tmp_path)
    assert (folder / "model_index.json").is_file()
    pipe_cls = type(build_tiny_pipeline(family))
    loaded = pipe_cls.from_pretrained(folder, local_files_only=True)
    assert isinstance(loaded, diffusers.DiffusionPipeline)
    assert loaded.vae_scale_factor == VAE_FACTORS[family]
    assert loaded.vae.config.latent_channels == 4
    tokenizer = loaded.tokenizer if family != "sdxl-refiner" else loaded.tokenizer_2
    ids = tokenizer("an astronaut riding a horse", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id


def test_tiny_esrgan_is_an_x2_rrdb_net_for_spandrel(tmp_path):
    from spandrel import ImageModelDescriptor, ModelLoader

    path = materialize_tiny("esrgan", root=tmp_path) / TINY_WEIGHTS_FILE
    model = ModelLoader().load_from_file(path)
    assert isinstance(model, ImageModelDescriptor)
    assert (model.architecture.name, model.scale, model.input_channels) == ("ESRGAN", 2, 3)


def test_latent_spaces_are_shared():
    # Latents move SD 2.1 -> x2 latent upscaler and SDXL base -> refiner untouched.
    for a, b in (("sd21", "sd-x2-latent-upscaler"), ("sdxl", "sdxl-refiner")):
        va, vb = build_tiny_pipeline(a).vae.state_dict(), build_tiny_pipeline(b).vae.state_dict()
        assert all((va[k] == vb[k]).all() for k in va)


def test_materialize_is_cached_and_safe_under_concurrency(tmp_path):
    results, errors = [], []

    def build():
        try:
            results.append(materialize_tiny("sd21", root=tmp_path))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_tiny_weights_are_seeded(tmp_path):
    a = build_tiny_pipeline("sd21").unet.state_dict()
    b = build_tiny_pipeline("sd21").unet.state_dict()
    assert all((a[k] == b[k]).all() for k in a)


def test_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny family"):
        materialize_tiny("sd3", root=tmp_path)


def test_the_builder_unshrunk_is_the_real_architecture():
    """benchmarks/gpu.py builds full-size models with the tiny builder, nothing shrunk: on
    the meta device, SD 2.1's UNet and text encoder have the published parameter counts
    (865.9M and 340.4M) and the real configs."""
    import torch

    from deployments.standins.tiny import pipeline_from_real_configs, read_real_config

    with torch.device("meta"):
        pipe = pipeline_from_real_configs("sd21", shrink=False)
    counts = {key: sum(p.numel() for p in getattr(pipe, key).parameters())
              for key in ("unet", "text_encoder")}
    assert counts == {"unet": 865_910_724, "text_encoder": 340_387_840}
    real = read_real_config("sd21", "unet/config.json")
    assert list(pipe.unet.config.block_out_channels) == real["block_out_channels"]
