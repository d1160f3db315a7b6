"""The one Source type: huggingface_hub's hf:// grammar, Hub ids, local paths, plug-in kinds."""

import copy

import pytest

from deployments.sources import HUB, HUB_FILE, LOCAL, Source, local_path, source_kinds, stand_in_model
from serve_app.config import ConfigError, load_app_config


def test_hf_uris_follow_huggingface_hubs_grammar():
    plain = Source.parse("hf://ai-forever/Real-ESRGAN/RealESRGAN_x2.pth")
    assert (plain.kind, plain.repo_id, plain.revision, plain.path_in_repo) == (
        HUB_FILE, "ai-forever/Real-ESRGAN", None, "RealESRGAN_x2.pth")
    pinned = Source.parse("hf://ai-forever/Real-ESRGAN@refs/pr/3/weights/x2.pth")
    assert (pinned.revision, pinned.path_in_repo) == ("refs/pr/3", "weights/x2.pth")
    assert Source.parse("hf://datasets/org/data/x.pth").repo_type == "dataset"
    assert str(pinned) == "hf://ai-forever/Real-ESRGAN@refs/pr/3/weights/x2.pth"


@pytest.mark.parametrize("text, message", [
    ("hf://ai-forever/Real-ESRGAN/RealESRGAN_x2.pth@v1", "revision goes right after the repo id"),
    ("hf://ai-forever/Real-ESRGAN", "names one file"),
    ("hf://just-one-part", "namespace/name"),
    ("ftp:somewhere", "unknown source kind 'ftp:'"),
    ("tiny:", "names nothing"),
    ("   ", "non-empty"),
])
def test_bad_sources_are_refused_with_the_reason(text, message):
    with pytest.raises(ValueError, match=message):
        Source.parse(text)


def test_hub_ids_local_paths_and_stand_ins(tmp_path):
    assert Source.parse("stabilityai/stable-diffusion-xl-base-1.0").kind == HUB
    assert Source.parse(str(tmp_path)).kind == LOCAL
    assert Source.parse("./weights/sdxl").kind == LOCAL
    tiny = Source.parse("tiny:sdxl")
    assert tiny.stand_in and tiny.family == "sdxl" and tiny.lora is None
    lora = Source.parse("tiny:lora/sd21/ink")
    assert lora.stand_in and lora.family is None and lora.lora == ("sd21", "ink")
    assert {"tiny", "sim"} <= set(source_kinds())  # the stand-ins' entry points
    # A source is its text: configs, logs and tests name it as written.
    assert tiny == "tiny:sdxl" and str(tiny) == "tiny:sdxl" and hash(tiny) == hash("tiny:sdxl")
    assert Source.hub("a/b") == Source.parse("a/b")


def test_the_loaders_get_paths_from_the_registry(tmp_path):
    assert local_path(Source.parse(str(tmp_path))) == str(tmp_path)
    assert local_path(Source.parse("a/b")) == "a/b"  # from_pretrained downloads it
    assert local_path(Source.parse("tiny:esrgan")).endswith("model.pth")
    assert stand_in_model(Source.parse("tiny:sd21"), "sd21") is None  # weights, not a model
    simulated = stand_in_model(Source.parse("sim:sd21"), "sd21")
    assert type(simulated).__name__ == "SimPipeline"
    with pytest.raises(ValueError, match="stands in for sd21, not for sdxl"):
        stand_in_model(Source.parse("sim:sd21"), "sdxl")


def test_the_config_parses_each_source_once_and_writes_it_back(tiny_args):
    config = load_app_config(tiny_args)
    model = config.model("stable-diffusion-xl")
    assert isinstance(model.source, Source) and isinstance(model.preview_decoder, Source)
    assert isinstance(model.loras[0].source, Source)
    spec = model.pipeline_spec()
    assert spec.source is model.source and spec.loras[0].source is model.loras[0].source
    dumped = config.model_dump(mode="json")
    assert dumped["models"][1]["source"] == "tiny:sdxl"
    assert load_app_config(dumped).model("stable-diffusion-xl").source == model.source


def test_a_bad_source_fails_the_config_at_its_path(tiny_args):
    args = copy.deepcopy(tiny_args)  # the fixture is the session's
    args["models"][0]["source"] = "hf://org/repo/file.pth@main"
    with pytest.raises(ConfigError, match=r"models\.0\.source: .*revision goes right after"):
        load_app_config(args)
