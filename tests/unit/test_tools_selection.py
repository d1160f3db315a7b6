"""What `serve-app check` and `fetch` select of a pipeline repo is what diffusers'
``DiffusionPipeline.download`` takes: its own allow and ignore patterns, captured from a run
against a faked Hub, applied with huggingface_hub's filter (snapshot_download's)."""

from __future__ import annotations

import json
import types

import pytest

from serve_app.tools.selection import select_files
from tests.unit.test_weights import SD21_INDEX, SD21_REPO

SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True, "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}
# The listing of stabilityai/stable-diffusion-xl-base-1.0, more or less: root single-file
# checkpoints, ONNX and OpenVINO exports, a second VAE folder, and (here) a text encoder
# sharded in the fp16 variant only.
SDXL_REPO = [
    ".gitattributes", "01.png", "LICENSE.md", "README.md", "model_index.json",
    "sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors",
    "sd_xl_offset_example-lora_1.0.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/model.onnx", "text_encoder/openvino_model.bin", "text_encoder/openvino_model.xml",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
    "text_encoder_2/model.fp16-00001-of-00002.safetensors",
    "text_encoder_2/model.fp16-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.fp16.json", "text_encoder_2/model.onnx",
    "text_encoder_2/model.onnx_data",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "tokenizer_2/merges.txt", "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json", "tokenizer_2/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/model.onnx", "unet/model.onnx_data",
    "unet/openvino_model.bin", "unet/openvino_model.xml",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae_1_0/config.json", "vae_1_0/diffusion_pytorch_model.safetensors",
    "vae_decoder/config.json", "vae_decoder/model.onnx", "vae_encoder/config.json",
    "vae_encoder/model.onnx",
]
SHARD_INDEX = {"weight_map": {"a": "model.fp16-00001-of-00002.safetensors",
                              "b": "model.fp16-00002-of-00002.safetensors"}}
# SD 2.1 where the VAE has only pickled weights: diffusers then takes .bin throughout.
SD21_VAE_BIN = [f for f in SD21_REPO if not (f.startswith("vae/") and f.endswith(".safetensors"))]


def download_takes(monkeypatch, tmp_path, files, index, **kwargs) -> set[str]:
    """The files ``DiffusionPipeline.download`` would fetch of a repo listing ``files``."""
    from diffusers import DiffusionPipeline
    from diffusers.pipelines import pipeline_utils
    from huggingface_hub.utils import filter_repo_objects

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir(exist_ok=True)
    (snapshot / "model_index.json").write_text(json.dumps(index))
    captured = {}

    def fake_snapshot_download(repo_id, **options):
        captured.update(options)
        return str(snapshot)

    siblings = [types.SimpleNamespace(rfilename=name) for name in files]
    monkeypatch.setattr(pipeline_utils, "_resolve_revision", lambda name, **kw: kw.get("revision"))
    monkeypatch.setattr(pipeline_utils, "model_info",
                        lambda *a, **kw: types.SimpleNamespace(siblings=siblings))
    monkeypatch.setattr(pipeline_utils, "hf_hub_download",
                        lambda *a, **kw: str(snapshot / "model_index.json"))
    monkeypatch.setattr(pipeline_utils, "snapshot_download", fake_snapshot_download)
    DiffusionPipeline.download("someone/pipeline", **kwargs)
    return set(filter_repo_objects(files, allow_patterns=captured["allow_patterns"],
                                   ignore_patterns=captured["ignore_patterns"]))


def reader(index):
    return lambda path: index if path == "model_index.json" else SHARD_INDEX


CASES = {
    "sd21": (SD21_REPO, SD21_INDEX, None, ()),
    "sd21-fp16": (SD21_REPO, SD21_INDEX, "fp16", ()),
    "sd21-vae-bin": (SD21_VAE_BIN, SD21_INDEX, None, ()),
    "sdxl": (SDXL_REPO, SDXL_INDEX, None, ()),
    "sdxl-fp16-vae-passed": (SDXL_REPO, SDXL_INDEX, "fp16", ("vae",)),
}


@pytest.mark.parametrize("case", CASES)
def test_the_selection_is_what_diffusers_downloads(monkeypatch, tmp_path, case):
    files, index, variant, passed = CASES[case]
    selection = select_files("pipeline", files, reader(index), variant=variant,
                                     passed=passed)
    assert selection.usable, (selection.missing, selection.problems)
    expected = download_takes(monkeypatch, tmp_path, files, index, variant=variant,
                              **{name: object() for name in passed})
    assert set(selection.files) == expected


def test_a_passed_vae_is_neither_needed_nor_fetched():
    files = [f for f in SDXL_REPO if not f.startswith("vae/")]
    selection = select_files("pipeline", files, reader(SDXL_INDEX), variant="fp16",
                                     passed=("vae",))
    assert selection.usable and not any(f.startswith("vae/") for f in selection.files)
    # diffusers takes the weights of a folder model_index.json does not name (vae_1_0) too.
    assert "vae_1_0/diffusion_pytorch_model.safetensors" in selection.files
    assert "text_encoder_2/model.fp16-00002-of-00002.safetensors" in selection.files
    without = select_files("pipeline", files, reader(SDXL_INDEX), variant="fp16")
    assert without.missing == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors (weights)"]


def test_a_missing_shard_and_a_missing_vocabulary_are_named():
    files = [f for f in SDXL_REPO if f not in ("text_encoder_2/model.fp16-00002-of-00002.safetensors",
                                              "tokenizer_2/merges.txt")]
    selection = select_files("pipeline", files, reader(SDXL_INDEX), variant="fp16")
    assert selection.missing == ["tokenizer_2/tokenizer.json (or merges.txt + vocab.json)",
                                 "text_encoder_2/model.fp16-00002-of-00002.safetensors"]


def test_bin_weights_throughout_are_said():
    selection = select_files("pipeline", SD21_VAE_BIN, reader(SD21_INDEX))
    assert selection.usable
    assert "unet/diffusion_pytorch_model.bin" in selection.files
    assert any("no safetensors weights" in note for note in selection.notes)
