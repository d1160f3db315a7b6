import threading

import pytest

from deployments.tiny import TINY_FAMILIES, build_tiny_pipeline, materialize_tiny


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_pipelines_save_and_load_through_from_pretrained(tmp_path, family):
    import diffusers

    folder = materialize_tiny(family, root=tmp_path)
    assert (folder / "model_index.json").is_file()
    pipe_cls = type(build_tiny_pipeline(family))
    loaded = pipe_cls.from_pretrained(folder, local_files_only=True)
    assert isinstance(loaded, diffusers.DiffusionPipeline)
    # Sizes keep their meaning: 512 px is a 64-latent, as for the real models.
    assert loaded.vae_scale_factor == 8
    assert loaded.vae.config.latent_channels == 4
    tokenizer = loaded.tokenizer if family != "sdxl-refiner" else loaded.tokenizer_2
    ids = tokenizer("an astronaut riding a horse", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id


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


def test_sdxl_base_and_refiner_share_one_vae():
    base, refiner = build_tiny_pipeline("sdxl").vae.state_dict(), build_tiny_pipeline("sdxl-refiner").vae.state_dict()
    assert all((base[k] == refiner[k]).all() for k in base)


def test_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny family"):
        materialize_tiny("sd3", root=tmp_path)
