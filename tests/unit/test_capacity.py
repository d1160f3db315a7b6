"""`serve-app capacity`: the GPU configs fit their GPUs, the counted weights are the published
sizes, over-commitment is caught, and the memory levers (fp16-fixed VAE, VAE tiling) show."""

import copy
import json

import pytest
import yaml

from serve_app.tools import capacity
from serve_app.tools.capacity import GiB, capacity_command, estimate_app
from serve_app.config import ConfigError, load_app_config, parse_memory
from serve_app.tools.launch import load_serve_config
from tests.conftest import REPO_ROOT

LOCAL = REPO_ROOT / "configs" / "local-gpu.yaml"
CLUSTER = REPO_ROOT / "configs" / "cluster.yaml"


def _args(path):
    return load_serve_config(path)["applications"][0]["args"]


def _estimates(args):
    app = load_app_config(args)
    return {e.name: e for e in estimate_app(app)}, app


def _write(tmp_path, serve_config):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(serve_config))
    return str(path)


@pytest.mark.parametrize("path, memory", [(LOCAL, "24GiB"), (CLUSTER, None)], ids=["local-gpu", "cluster"])
def test_gpu_configs_fit(path, memory, capsys):
    assert capacity_command(str(path), memory) == 0
    out = capsys.readouterr().out
    assert "OVER-COMMITTED" not in out and out.rstrip().endswith("fits")


def test_cluster_names_its_gpu():
    app = load_app_config(_args(CLUSTER))
    assert app.gpu is not None and app.gpu.name and app.gpu.memory_bytes >= 20 * GiB


# Published fp16 sizes (decimal GB), the figures in capacity.PUBLISHED_FP16_GB.
@pytest.mark.parametrize("family, tolerance", [
    ("sd21", 0.10), ("sdxl", 0.10), ("sdxl-refiner", 0.10), ("sd-x4-upscaler", 0.10),
    ("safety-checker", 0.10),
    # "~1 GB" is a rounded figure: the count is 1.16 GB (UNet 372.6M, CLIP ViT-L/14 text
    # 123.1M and SD VAE 83.7M parameters; the last two are the published component sizes).
    ("sd-x2-latent-upscaler", 0.20),
])
def test_weights_match_published_fp16_sizes(family, tolerance):
    estimates, _ = _estimates(_args(LOCAL))
    (estimate,) = [e for e in estimates.values() if e.family == family]
    assert estimate.dtype == "float16"
    counted = (estimate.weights - estimate.components.get("preview_decoder", 0)) / 1e9
    published = capacity.PUBLISHED_FP16_GB[family]
    assert abs(counted - published) <= tolerance * published, f"{family}: {counted:.2f} GB"


def test_weights_count_the_real_components():
    estimates, _ = _estimates(_args(LOCAL))
    sdxl = estimates["stable-diffusion-xl"]
    assert set(sdxl.components) == {"text_encoder", "text_encoder_2", "unet", "vae", "preview_decoder"}
    assert set(estimates["stable-diffusion-xl-refiner"].components) == {"text_encoder_2", "unet", "vae"}
    assert 2.5e9 * 2 < sdxl.components["unet"] < 2.6e9 * 2  # 2.57B parameters
    assert estimates["esrgan-x2"].weights == pytest.approx(16.7e6 * 2, rel=0.01)  # RRDB 23 blocks


def test_weights_are_counted_in_the_deployments_dtype():
    # accelerate's compute_module_sizes, from float32 modules: a text encoder whose config says
    # torch_dtype float16 still counts 4 bytes a parameter in float32 (integer buffers aside).
    components, pipeline_class = capacity.family_pipeline("sdxl")
    assert pipeline_class == "StableDiffusionXLPipeline"
    for component in components:
        assert component.nbytes("float32") == pytest.approx(2 * component.nbytes("float16"), rel=1e-5)
        assert component.nbytes("bfloat16") == component.nbytes("float16")


@pytest.mark.parametrize("memory", ["8GiB", "16GiB"])
def test_too_small_a_gpu_is_over_committed(memory, capsys):
    assert capacity_command(str(LOCAL), memory) == 1
    out = capsys.readouterr().out
    assert "OVER-COMMITTED" in out
    assert "stable-diffusion-xl: peak" in out and "over its share" in out


def test_the_flag_overrides_the_configs_gpu(capsys):
    assert capacity_command(str(CLUSTER), "8GiB") == 1
    assert "stable-diffusion-xl: peak" in capsys.readouterr().out


def test_num_gpus_above_one_gpu_is_over_committed(tmp_path, capsys):
    serve_config = load_serve_config(LOCAL)
    args = serve_config["applications"][0]["args"]
    for model in args["models"]:
        model["deployment"]["num_gpus"] = 0.3
    assert capacity_command(_write(tmp_path, serve_config), "24GiB") == 1
    out = capsys.readouterr().out
    assert "num_gpus x max replicas sum to" in out
    assert "all replicas together peak at" not in out  # 0.3 x 24 GiB each: every peak fits


def test_replicas_that_fit_their_shares_can_still_overfill_one_gpu(tmp_path, capsys):
    serve_config = load_serve_config(LOCAL)
    args = serve_config["applications"][0]["args"]
    sd21 = next(m for m in args["models"] if m["family"] == "sd21")
    sd21["deployment"]["autoscaling_config"]["max_replicas"] = 2
    assert capacity_command(_write(tmp_path, serve_config), "24GiB") == 1
    out = capsys.readouterr().out
    assert "all replicas together peak at" in out and "stable-diffusion-2-1 8." in out


def test_cpu_only_deployments_are_listed_not_counted(capsys):
    assert capacity_command(str(REPO_ROOT / "configs" / "tiny.yaml"), "1GiB") == 0
    out = capsys.readouterr().out
    assert "stable-diffusion-xl " in out and " cpu" in out


def test_fp16_fixed_vae_decodes_with_less_memory():
    args = _args(LOCAL)
    fixed, _ = _estimates(args)
    plain_args = copy.deepcopy(args)
    for model in plain_args["models"]:
        if model["family"] in ("sdxl", "sdxl-refiner"):
            model.pop("vae")
    plain, _ = _estimates(plain_args)
    for name in ("stable-diffusion-xl", "stable-diffusion-xl-refiner"):
        with_fix, without = fixed[name].phases["vae"], plain[name].phases["vae"]
        # float32 activations and a float32 copy of the VAE's weights while decoding
        assert without[1] >= 2 * with_fix[1] and without[0] > with_fix[0]
        assert any("float32" in note for note in plain[name].notes)
        assert not any("float32" in note for note in fixed[name].notes)


def test_vae_tiling_lowers_the_x4_upscalers_peak():
    args = _args(CLUSTER)
    tiled, _ = _estimates(args)
    untiled_args = copy.deepcopy(args)
    x4 = next(m for m in untiled_args["models"] if m["family"] == "sd-x4-upscaler")
    x4["vae_tiling"] = False
    untiled, _ = _estimates(untiled_args)
    name = "stable-diffusion-x4-upscaler"
    assert tiled[name].phases["vae"][1] * 10 < untiled[name].phases["vae"][1]
    assert tiled[name].total < untiled[name].total
    # 0.39 MP in, 6.3 MP out, decoded in float32: ~14 GiB untiled, over its 0.5 x L4 share
    assert untiled[name].total > untiled[name].num_gpus * parse_memory("23034MiB")


def test_batch_is_the_largest_job_or_batch():
    args = copy.deepcopy(_args(LOCAL))
    sd21 = next(m for m in args["models"] if m["family"] == "sd21")
    sd21["batching"]["max_batch_images"] = 1
    estimates, app = _estimates(args)
    assert estimates["stable-diffusion-2-1"].batch == 4  # one request of n=4 runs as one call
    assert estimates["SafetyChecker"].batch == max(8, *(m.limits.max_n for m in app.models))


def test_step_mode_takes_a_unet_call_and_a_decode_of_the_same_images():
    args = copy.deepcopy(_args(LOCAL))
    sd21 = next(m for m in args["models"] if m["family"] == "sd21")
    sd21["batching"] = {**sd21["batching"], "max_batch_images": 8}
    sd21["vae_slicing"] = False  # (with slicing, a decode takes one image at a time)
    sd21["deployment"] = {**sd21["deployment"], "max_ongoing_requests": 8}
    request, _ = _estimates(args)
    sd21["batching"] = {**sd21["batching"], "mode": "step"}
    step, _ = _estimates(args)
    name = "stable-diffusion-2-1"
    assert step[name].batch == request[name].batch == 8  # one UNet call
    assert step[name].phases["unet"] == request[name].phases["unet"]
    assert step[name].phases["vae"] == request[name].phases["vae"]  # the jobs ending on one step
    assert "step mode: 8 images a UNet call and a decode, up to 128 in flight" in step[name].notes


def test_gpu_memory_is_validated():
    args = copy.deepcopy(_args(CLUSTER))
    args["gpu"] = {"name": "NVIDIA L4", "memory": "lots"}
    with pytest.raises(ConfigError, match="gpu.memory"):
        load_app_config(args)
    assert parse_memory("24GiB") == 24 * GiB and parse_memory("80GB") == 80 * 10**9
    assert parse_memory("48Gi") == 48 * GiB


# The activation formula against a count of live tensor bytes while the real modules run on
# the meta device (SDPA as a fused kernel: its output only). The formula may be above the
# count (it is an upper estimate), not below.

def _trace_peak(fn, *args, **kwargs):
    import torch
    import torch.nn.functional as F
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.current, self.peak = {}, 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                self.current -= self.live.pop(key)[1]
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    if storage._cdata not in self.live:
                        self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                        self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            return out

    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: q.new_empty(q.shape[:-1] + v.shape[-1:])
    try:
        with torch.inference_mode(), LiveBytes() as mode:
            fn(*args, **kwargs)
    finally:
        F.scaled_dot_product_attention = sdpa
    return mode.peak


def _config(folder):
    return json.loads((REPO_ROOT / "deployments" / "model_configs" / folder / "config.json").read_text())


@pytest.mark.parametrize("folder, side", [("sd21", 96), ("sdxl", 128), ("sd-x4-upscaler", 64)])
def test_unet_formula_bounds_a_meta_trace(folder, side):
    import torch
    from diffusers import UNet2DConditionModel

    config = _config(f"{folder}/unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).half()
    batch = 2
    meta = {"device": "meta", "dtype": torch.float16}
    kwargs = {}
    if config.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, 1280, **meta),
                                       "time_ids": torch.empty(batch, 6, **meta)}
    if config.get("num_class_embeds"):
        kwargs["class_labels"] = torch.zeros(batch, dtype=torch.long, device="meta")
    traced = _trace_peak(
        unet, torch.empty(batch, config["in_channels"], side, side, **meta),
        torch.full((batch,), 10.0, device="meta"),
        torch.empty(batch, 77, config["cross_attention_dim"], **meta), **kwargs,
    )
    formula = batch * capacity.unet_activation_elements(config, side * side) * 2
    assert traced <= formula <= 1.1 * traced, (formula / traced)


@pytest.mark.parametrize("folder, side, tiling, dtype", [
    ("sdxl/vae", 1024, False, "float32"), ("sd21/vae", 768, False, "float16"),
    ("sd-x4-upscaler/vae", 1024, True, "float32"),
])
def test_vae_formula_bounds_a_meta_trace(folder, side, tiling, dtype):
    import torch
    from diffusers import AutoencoderKL

    config = _config(folder)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config).to(getattr(torch, dtype))
    if tiling:
        vae.enable_tiling()
    factor = capacity.vae_spatial_factor(config)
    latents = torch.empty(1, 4, side // factor, side // factor, device="meta", dtype=getattr(torch, dtype))
    traced = _trace_peak(lambda z: vae.decode(z).sample, latents)
    formula = capacity.vae_decode_bytes(config, side * side, 1, capacity._BYTES[dtype], tiling, False)
    assert traced <= formula <= 1.1 * traced, (formula / traced)
