"""serve-app check / fetch: the files each weights source needs, on local folders and a
faked Hub (nothing here reaches the network; tests/conftest.py sets HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from serve_app.tools import hub as hub_module
from serve_app.tools import weights
from serve_app.tools.selection import select_files
from serve_app.tools.cli import main
from serve_app.config import load_app_config
from serve_app.tools.launch import load_serve_config

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"
LOCAL_GPU_CONFIG = REPO_ROOT / "configs" / "local-gpu.yaml"
MODEL_COMPONENTS = ("text_encoder", "unet", "vae")


# --- helpers ---------------------------------------------------------------------------


def write_config(path: Path, **model0) -> Path:
    """configs/tiny.yaml with the first model's keys replaced by ``model0``."""
    config = load_serve_config(TINY_CONFIG)
    config["applications"][0]["args"]["models"][0].update(model0)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def line_of(output: str, label: str) -> str:
    [line] = [line for line in output.splitlines() if label in line]
    return line


def listing(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(folder).parts}


@pytest.fixture(scope="module")
def tiny_sd21(tmp_path_factory) -> Path:
    from deployments.standins.tiny import materialize_tiny

    return materialize_tiny("sd21", root=tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def sd21_folder(tiny_sd21, tmp_path) -> Path:
    """A copy of tiny SD 2.1 with what real repos carry beside the needed files: a
    root-level single-file checkpoint, .bin beside .safetensors, fp16 variant copies,
    flax / ONNX / OpenVINO weights, a README and an image."""
    folder = tmp_path / "sd21-local"
    shutil.copytree(tiny_sd21, folder)
    (folder / "v2-1_768.ckpt").write_bytes(b"ckpt")
    (folder / "v2-1_768-ema-pruned.safetensors").write_bytes(b"single file")
    (folder / "README.md").write_text("# model card")
    (folder / "images").mkdir()
    (folder / "images" / "sample.png").write_bytes(b"png")
    for component in MODEL_COMPONENTS:
        [weights] = (folder / component).glob("*.safetensors")
        stem = weights.name.removesuffix(".safetensors")
        shutil.copy(weights, weights.with_name(f"{stem}.fp16.safetensors"))
        bin_stem = "pytorch_model" if stem == "model" else stem
        (folder / component / f"{bin_stem}.bin").write_bytes(b"bin")
        (folder / component / f"{bin_stem}.fp16.bin").write_bytes(b"bin")
    (folder / "unet" / "diffusion_flax_model.msgpack").write_bytes(b"flax")
    (folder / "text_encoder" / "model.onnx").write_bytes(b"onnx")
    (folder / "vae" / "openvino_model.bin").write_bytes(b"openvino")
    return folder


def needed_files(folder: Path, variant: str | None = None) -> set[str]:
    """What the loader of tiny SD 2.1 reads, written out (tokenizer files as saved)."""
    dot = f".{variant}" if variant else ""
    files = {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json", f"text_encoder/model{dot}.safetensors",
        "unet/config.json", f"unet/diffusion_pytorch_model{dot}.safetensors",
        "vae/config.json", f"vae/diffusion_pytorch_model{dot}.safetensors",
    }
    files |= {f"tokenizer/{p.name}" for p in (folder / "tokenizer").iterdir()}
    if (folder / "feature_extractor").is_dir():
        files.add("feature_extractor/preprocessor_config.json")
    return files


# --- check -----------------------------------------------------------------------------


def test_check_tiny_config_reports_tiny_sources(capsys):
    code, out = run(capsys, "check", TINY_CONFIG)
    assert code == 0, out
    lines = [line for line in out.splitlines() if " = tiny:" in line]
    # Every model source, the SDXL preview decoder and the safety checker.
    assert len(lines) == 8
    assert all(line.startswith("OK") and "stand-in source" in line and "nothing to download" in line
               for line in lines)


def test_check_invalid_config_exits_2(capsys, tmp_path):
    config = write_config(tmp_path / "bad.yaml", famly="sd21")
    code, out = run(capsys, "check", config)
    assert code == 2
    assert "models.0.famly: unknown key" in out


def test_check_local_folder_is_usable(capsys, tmp_path, sd21_folder):
    config = write_config(tmp_path / "local.yaml", source=str(sd21_folder))
    code, out = run(capsys, "check", config)
    assert code == 0, out
    line = line_of(out, "models[0] (stable-diffusion-2-1).source")
    assert line.startswith("OK") and "local pipeline folder" in line and "usable" in line


def test_check_names_missing_files(capsys, tmp_path, sd21_folder):
    (sd21_folder / "unet" / "config.json").unlink()
    for weights in (sd21_folder / "vae").glob("diffusion_pytorch_model*"):
        weights.unlink()
    (sd21_folder / "scheduler" / "scheduler_config.json").unlink()
    config = write_config(tmp_path / "local.yaml", source=str(sd21_folder))
    code, out = run(capsys, "check", config)
    assert code == 1
    line = line_of(out, "models[0] (stable-diffusion-2-1).source")
    assert line.startswith("PROBLEM")
    assert "unet/config.json" in line
    assert "scheduler/scheduler_config.json" in line
    assert "vae/diffusion_pytorch_model.safetensors" in line
    # vae/openvino_model.bin is no weights of the diffusers loader.
    assert "1 with problems" in out


def test_check_missing_model_index_and_missing_folder(capsys, tmp_path, sd21_folder):
    (sd21_folder / "model_index.json").unlink()
    config = write_config(tmp_path / "a.yaml", source=str(sd21_folder))
    code, out = run(capsys, "check", config)
    assert code == 1 and "missing model_index.json" in line_of(out, "models[0]")
    config = write_config(tmp_path / "b.yaml", source=str(tmp_path / "nowhere"))
    code, out = run(capsys, "check", config)
    assert code == 1 and "no such folder" in line_of(out, "models[0]")


def test_check_variant(capsys, tmp_path, sd21_folder):
    config = write_config(tmp_path / "fp16.yaml", source=str(sd21_folder), variant="fp16")
    code, out = run(capsys, "check", config)
    assert code == 0, out
    config = write_config(tmp_path / "bf16.yaml", source=str(sd21_folder), variant="bf16")
    code, out = run(capsys, "check", config)
    assert code == 1
    line = line_of(out, "models[0]")
    assert line.startswith("PROBLEM") and "variant 'bf16' not found" in line


def test_check_variant_missing_in_one_component_falls_back(capsys, tmp_path, sd21_folder):
    # diffusers loads the default weights of a component without the variant.
    for variant_file in (sd21_folder / "vae").glob("*.fp16.*"):
        variant_file.unlink()
    config = write_config(tmp_path / "fp16.yaml", source=str(sd21_folder), variant="fp16")
    code, out = run(capsys, "check", config)
    assert code == 0, out
    assert "vae: no fp16 weights, the default ones load" in line_of(out, "models[0]")


def test_check_local_single_file_and_model_folders(capsys, tmp_path):
    weights = tmp_path / "RealESRGAN_x2plus.pth"
    weights.write_bytes(b"pth")
    decoder = tmp_path / "taesd"
    decoder.mkdir()
    (decoder / "config.json").write_text("{}")
    config = load_serve_config(TINY_CONFIG)
    args = config["applications"][0]["args"]
    args["models"][5]["source"] = str(weights)
    args["models"][0]["preview_decoder"] = str(decoder)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    code, out = run(capsys, "check", path)
    assert code == 1
    assert line_of(out, "models[5] (esrgan-x2).source").startswith("OK")
    decoder_line = line_of(out, "models[0] (stable-diffusion-2-1).preview_decoder")
    assert "local model folder" in decoder_line
    assert "diffusion_pytorch_model.safetensors or model.safetensors (weights)" in decoder_line


# --- select_files on listings ------------------------------------------------------------


def test_model_layout_takes_only_the_loaders_files():
    # madebyollin/sdxl-vae-fp16-fix: a root-level single-file checkpoint beside the
    # diffusers weights, .bin beside .safetensors.
    files = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "sdxl_vae.safetensors", "sdxl.vae.safetensors", "README.md", "images/compare.png"]
    selection = select_files("model", files)
    assert selection.usable and set(selection.files) == {"config.json",
                                                         "diffusion_pytorch_model.safetensors"}
    # The safety checker also needs its image processor's config (from the registry).
    ref = next(r for r in weights.sources_of(load_app_config(
        load_serve_config(LOCAL_GPU_CONFIG)["applications"][0]["args"])) if r.key[0] == "safety")
    assert ref.config_files == ("config.json", "preprocessor_config.json")
    selection = weights.select_for(ref, ["config.json", "preprocessor_config.json",
                                         "pytorch_model.bin", "model.safetensors", "README.md"], None)
    assert set(selection.files) == {"config.json", "preprocessor_config.json", "model.safetensors"}
    selection = weights.select_for(ref, ["config.json", "pytorch_model.bin"], None)
    assert selection.missing == ["preprocessor_config.json"]


def test_sharded_weights_need_every_shard():
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    files = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"]
    selection = select_files("model", files, lambda path: index)
    assert set(selection.files) == set(files)
    assert selection.missing == ["model-00002-of-00002.safetensors"]


# --- fetch from a local folder ---------------------------------------------------------


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_fetch_local_folder_copies_exactly_the_needed_files(capsys, tmp_path, sd21_folder, variant):
    extra = {"variant": variant} if variant else {}
    config = write_config(tmp_path / "local.yaml", source=str(sd21_folder), **extra)
    to = tmp_path / "fetched"
    code, out = run(capsys, "fetch", config, "--to", to)
    assert code == 0, out
    written = to / "local.yaml"
    args = load_serve_config(written)["applications"][0]["args"]
    app = load_app_config(args)
    fetched = Path(str(app.models[0].source))
    assert fetched.is_absolute() and fetched.parent == to.resolve()
    assert listing(fetched) == needed_files(sd21_folder, variant)
    # Tiny sources stay as they are; everything else is kept.
    assert str(app.models[1].source) == "tiny:sdxl" and str(app.safety.source) == "tiny:safety-checker"
    original = load_serve_config(config)
    assert list(load_serve_config(written)) == list(original)
    assert list(args["models"][0]) == list(original["applications"][0]["args"]["models"][0])
    total = sum((fetched / f).stat().st_size for f in listing(fetched))
    assert f"fetched {total} bytes" in out
    # The fetched folder checks clean, and diffusers loads it as the deployment would
    # (with the variant on GPU).
    code, out = run(capsys, "check", written)
    assert code == 0, out
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(fetched, local_files_only=True, **extra)
    assert pipe.unet is not None and pipe.tokenizer is not None


def test_fetch_out_file_and_shared_source(capsys, tmp_path, sd21_folder):
    # Two models on one folder: one copy, counted once.
    config = load_serve_config(TINY_CONFIG)
    models = config["applications"][0]["args"]["models"]
    models[0]["source"] = str(sd21_folder)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out_file = tmp_path / "deploy" / "serve.yaml"
    code, out = run(capsys, "fetch", path, "--to", tmp_path / "w", "--out", out_file)
    assert code == 0, out
    assert out_file.is_file() and not (tmp_path / "w" / "c.yaml").exists()


def test_fetch_refuses_an_incomplete_folder(capsys, tmp_path, sd21_folder):
    (sd21_folder / "unet" / "config.json").unlink()
    config = write_config(tmp_path / "local.yaml", source=str(sd21_folder))
    code, out = run(capsys, "fetch", config, "--to", tmp_path / "fetched")
    assert code == 1 and "unet/config.json" in out
    assert not (tmp_path / "fetched" / "local.yaml").exists()


# --- the Hub, faked --------------------------------------------------------------------

SD21_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.10.0.dev0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"], "requires_safety_checker": False,
    "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}
# The listing of stabilityai/stable-diffusion-2-1, more or less.
SD21_REPO = [
    ".gitattributes", "README.md", "model_index.json", "v2-1_768-ema-pruned.ckpt",
    "v2-1_768-ema-pruned.safetensors", "v2-1_768-nonema-pruned.ckpt",
    "feature_extractor/preprocessor_config.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin",
    "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.fp16.bin",
    "text_encoder/flax_model.msgpack",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_flax_model.msgpack",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_flax_model.msgpack",
]
SD21_FP16_NEEDED = {
    "model_index.json", "feature_extractor/preprocessor_config.json",
    "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors", "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
}


class FakeHub:
    """Stands in for HfApi (model_info, file_exists, repo_exists), hf_hub_download and
    snapshot_download."""

    def __init__(self, tmp_path: Path, repos: dict[str, list[str]]):
        self.repos, self.tmp_path = repos, tmp_path
        self.listed: list[tuple[str, str | None]] = []
        self.snapshots: list[dict] = []
        self.downloads: list[tuple] = []

    def install(self, monkeypatch) -> None:
        hub = self

        class FakeHfApi:
            def model_info(self, repo_id, *, revision=None, files_metadata=False, **_):
                hub.listed.append((repo_id, revision))
                if repo_id not in hub.repos:
                    from huggingface_hub.errors import RepositoryNotFoundError

                    response = types.SimpleNamespace(headers={}, request=None)
                    raise RepositoryNotFoundError(f"404 {repo_id}", response=response)
                siblings = [types.SimpleNamespace(rfilename=name) for name in hub.repos[repo_id]]
                return types.SimpleNamespace(id=repo_id, siblings=siblings)

            def file_exists(self, repo_id, filename, *, repo_type=None, revision=None, **_):
                hub.listed.append((repo_id, revision))
                return filename in hub.repos.get(repo_id, [])

            def repo_exists(self, repo_id, *, repo_type=None, **_):
                return repo_id in hub.repos

            def revision_exists(self, repo_id, revision, *, repo_type=None, **_):
                return repo_id in hub.repos and revision == "main"

        def fake_hf_hub_download(repo_id, filename, *, revision=None, local_dir=None, **_):
            hub.downloads.append((repo_id, filename, revision, local_dir))
            target = Path(local_dir or hub.tmp_path / "hub-cache" / repo_id) / filename
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(SD21_INDEX) if filename == "model_index.json" else "x")
            return str(target)

        def fake_snapshot_download(repo_id, *, revision=None, allow_patterns=None, local_dir=None, **_):
            hub.snapshots.append({"repo_id": repo_id, "revision": revision,
                                  "allow_patterns": list(allow_patterns), "local_dir": local_dir})
            for name in allow_patterns:
                (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(local_dir) / name).write_text("weights")
            return local_dir

        monkeypatch.setattr(hub_module, "HfApi", FakeHfApi)
        monkeypatch.setattr(hub_module, "hf_hub_download", fake_hf_hub_download)
        monkeypatch.setattr(weights, "hf_hub_download", fake_hf_hub_download)
        monkeypatch.setattr(weights, "snapshot_download", fake_snapshot_download)


@pytest.fixture
def online(monkeypatch, tmp_path) -> FakeHub:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub = FakeHub(tmp_path, {"stabilityai/stable-diffusion-2-1": SD21_REPO,
                             "ai-forever/Real-ESRGAN": ["README.md", "RealESRGAN_x2.pth",
                                                        "RealESRGAN_x4.pth"]})
    hub.install(monkeypatch)
    return hub


def hub_config(path: Path, **model0) -> Path:
    return write_config(path, **{"source": "stabilityai/stable-diffusion-2-1", **model0})


def test_hub_check_usable_repo(capsys, tmp_path, online):
    config = hub_config(tmp_path / "hub.yaml", variant="fp16", revision="main")
    code, out = run(capsys, "check", config)
    assert code == 0, out
    line = line_of(out, "models[0]")
    assert line.startswith("OK") and "Hub repo" in line and "repo exists" in line
    assert ("stabilityai/stable-diffusion-2-1", "main") in online.listed


def test_hub_check_missing_variant_and_repo(capsys, tmp_path, online):
    code, out = run(capsys, "check", hub_config(tmp_path / "a.yaml", variant="bf16"))
    assert code == 1 and "variant 'bf16' not found" in line_of(out, "models[0]")
    code, out = run(capsys, "check", hub_config(tmp_path / "b.yaml", source="nobody/no-such-model"))
    assert code == 1
    assert "repo nobody/no-such-model does not exist" in line_of(out, "models[0]")


def test_hub_check_single_file(capsys, tmp_path, online):
    config = load_serve_config(TINY_CONFIG)
    esrgan = config["applications"][0]["args"]["models"][5]
    esrgan["source"] = "hf://ai-forever/Real-ESRGAN/RealESRGAN_x3.pth"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    code, out = run(capsys, "check", path)
    assert code == 1 and "missing RealESRGAN_x3.pth" in line_of(out, "models[5]")


def test_hub_fetch_passes_the_selection(capsys, tmp_path, online):
    config = load_serve_config(TINY_CONFIG)
    models = config["applications"][0]["args"]["models"]
    models[0].update(source="stabilityai/stable-diffusion-2-1", variant="fp16")
    models[5]["source"] = "hf://ai-forever/Real-ESRGAN/RealESRGAN_x2.pth"
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    to = tmp_path / "fetched"
    code, out = run(capsys, "fetch", path, "--to", to)
    assert code == 0, out
    [snapshot] = online.snapshots
    assert snapshot["repo_id"] == "stabilityai/stable-diffusion-2-1"
    assert set(snapshot["allow_patterns"]) == SD21_FP16_NEEDED
    assert ("ai-forever/Real-ESRGAN", "RealESRGAN_x2.pth", None, str(to / "ai-forever--Real-ESRGAN")) \
        in online.downloads
    app = load_app_config(load_serve_config(to / "hub.yaml")["applications"][0]["args"])
    assert str(app.models[0].source) == str(to / "stabilityai--stable-diffusion-2-1--fp16")
    assert str(app.models[5].source) == str(to / "ai-forever--Real-ESRGAN" / "RealESRGAN_x2.pth")


def test_hub_fetch_without_variant_prefers_safetensors(capsys, tmp_path, online):
    code, out = run(capsys, "fetch", hub_config(tmp_path / "hub.yaml"), "--to", tmp_path / "f")
    assert code == 0, out
    [snapshot] = online.snapshots
    assert set(snapshot["allow_patterns"]) == {
        name.replace(".fp16", "") for name in SD21_FP16_NEEDED}


def test_offline_hub_ids_are_not_checked(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    class NoHub:
        def __init__(self):
            raise AssertionError("the Hub was asked while offline")

    monkeypatch.setattr(hub_module, "HfApi", NoHub)
    code, out = run(capsys, "check", hub_config(tmp_path / "hub.yaml", variant="fp16"))
    assert code == 0, out
    line = line_of(out, "models[0]")
    assert line.startswith("NOT CHECKED") and "not checked (offline)" in line
    code, out = run(capsys, "fetch", hub_config(tmp_path / "hub.yaml"), "--to", tmp_path / "f")
    assert code == 1 and "cannot reach the Hub" in out


def test_unanswered_hub_is_not_checked(capsys, tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    release = threading.Event()
    calls = []

    class SlowHfApi:
        def model_info(self, repo_id, **_):
            calls.append(repo_id)
            release.wait(5)
            return []

    monkeypatch.setattr(hub_module, "HfApi", SlowHfApi)
    config = load_serve_config(LOCAL_GPU_CONFIG)
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        code, out = run(capsys, "check", path, "--hub-timeout", "0.2")
    finally:
        release.set()
    assert code == 0, out
    assert "not checked (offline: no answer within 0.2s)" in out
    assert len(calls) == 1  # one timeout per run, not one per source


# --- capacity is wired -----------------------------------------------------------------


def test_capacity_subcommand_calls_capacity_command(monkeypatch):
    seen = []
    fake = types.ModuleType("serve_app.tools.capacity")
    fake.capacity_command = lambda config_path, gpu_memory: seen.append((config_path, gpu_memory)) or 3
    monkeypatch.setitem(sys.modules, "serve_app.tools.capacity", fake)
    assert main(["capacity", "configs/local-gpu.yaml", "--gpu-memory", "24GiB"]) == 3
    assert main(["capacity", "configs/local-gpu.yaml"]) == 3
    assert seen == [("configs/local-gpu.yaml", "24GiB"), ("configs/local-gpu.yaml", None)]


# --- the console script ----------------------------------------------------------------


def test_console_script_checks_local_gpu_config_offline():
    script = shutil.which("serve-app") or str(Path(sys.executable).with_name("serve-app"))
    assert Path(script).is_file(), "serve-app is not installed: pip install -e ."
    result = subprocess.run([script, "check", str(LOCAL_GPU_CONFIG)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not checked (offline)" in result.stdout
    assert "11 sources: 0 usable, 11 not checked, 0 with problems" in result.stdout


# --- serve-app tiny-config ---------------------------------------------------------------

CLUSTER_CONFIG = REPO_ROOT / "configs" / "cluster.yaml"


def _twin_models(serve_config):
    return serve_config["applications"][0]["args"]["models"]


def test_tiny_twin_replaces_every_source_and_keeps_the_gpu_layout(capsys, tmp_path):
    original = load_serve_config(CLUSTER_CONFIG)
    out = tmp_path / "cluster-tiny.yaml"
    assert main(["tiny-config", str(CLUSTER_CONFIG), "--out", str(out)]) == 0
    twin = load_serve_config(out)
    assert out.read_text().startswith("# Tiny twin of")
    for before, after in zip(_twin_models(original), _twin_models(twin), strict=True):
        assert after["source"] == f"tiny:{before['family']}"
        assert "variant" not in after and "revision" not in after
        assert after["deployment"] == before["deployment"]  # num_gpus, replicas, queues kept
        assert after["limits"] == before["limits"] and after["batching"] == before["batching"]
        for key in ("preview_decoder", "vae"):
            if key in before:
                assert after[key].startswith("tiny:"), (before["name"], key)
    sdxl = next(m for m in _twin_models(twin) if m["family"] == "sdxl")
    assert (sdxl["preview_decoder"], sdxl["vae"]) == ("tiny:taesdxl", "tiny:sdxl-vae-fp16-fix")
    args = twin["applications"][0]["args"]
    assert args["safety"]["source"] == "tiny:safety-checker"
    assert args["ingress"] == original["applications"][0]["args"]["ingress"]
    assert twin["proxy_location"] == original["proxy_location"]
    # Every source of the twin is a tiny one, which `serve-app check` finds usable offline.
    assert all(ref.source.kind == "tiny" for ref in weights.config_sources(out))
    load_app_config(args)


def test_tiny_twin_gives_loras_tiny_sources_and_prints_to_stdout(capsys, tmp_path):
    config = load_serve_config(LOCAL_GPU_CONFIG)
    sd21 = next(m for m in _twin_models(config) if m["family"] == "sd21")
    sd21["loras"] = [{"name": "watercolor", "source": "someone/watercolor-lora"}]
    sd21["allow_hub_loras"] = True
    path = tmp_path / "with-loras.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["tiny-config", str(path)]) == 0
    twin = yaml.safe_load(capsys.readouterr().out)
    twin_sd21 = next(m for m in _twin_models(twin) if m["family"] == "sd21")
    assert twin_sd21["loras"] == [{"name": "watercolor", "source": "tiny:lora/sd21/watercolor"}]
    assert "allow_hub_loras" not in twin_sd21


def test_tiny_twin_of_an_invalid_config_exits_2(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("applications: [{name: x, import_path: serve_app.app:build_app, "
                    "args: {models: [{name: m, family: nope, source: a/b}]}}]\n")
    assert main(["tiny-config", str(path)]) == 2
    assert "models.0.family" in capsys.readouterr().err
