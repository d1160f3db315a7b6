"""CUDA paths on tiny models: fp16, SDPA attention, the safety checker and TAESD previews
on the GPU. Skipped without CUDA (CI has none; run them on a GPU machine)."""

import asyncio

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def spec(**fields):
    from deployments.contract import PipelineSpec

    return PipelineSpec(**{"name": "sd", "family": "sd21", "source": "tiny:sd21", "dtype": "float16",
                           **fields})


def test_sd21_runs_in_fp16_with_sdpa_on_cuda():
    from diffusers.models.attention_processor import AttnProcessor2_0

    from deployments.contract import TextToImageJob
    from deployments.pipelines.stable_diffusion import StableDiffusionDeployment

    sd = StableDiffusionDeployment(spec())
    assert sd.device == "cuda" and sd.pipe.unet.dtype == torch.float16
    assert all(isinstance(p, AttnProcessor2_0) for p in sd.pipe.unet.attn_processors.values())
    job = TextToImageJob("a red fox", None, 256, 256, 4, 7.5, (1, 2))
    images = asyncio.run(sd.text_to_image(job)).output
    assert images.shape == (2, 256, 256, 3) and images.dtype == np.uint8 and images.std() > 0


def test_preview_decoder_runs_on_cuda():
    from deployments.contract import TextToImageJob
    from deployments.pipelines.stable_diffusion import StableDiffusionDeployment

    sd = StableDiffusionDeployment(spec(preview_decoder="tiny:taesd"))
    assert sd.preview_decoder.device.type == "cuda" and sd.preview_decoder.dtype == torch.float16

    async def collect():
        job = TextToImageJob("a red fox", None, 128, 96, 6, 7.5, (7,))
        return [event async for event in sd.stream(job, partial_images=2)]

    *partials, final = asyncio.run(collect())
    assert [e[2].shape for e in partials] == [(96, 128, 3)] * 2


def test_safety_checker_in_fp16_agrees_with_float32_on_cpu():
    from deployments.contract import SafetyJob, TextToImageJob
    from deployments.pipelines.safety import SafetyCheckerDeployment
    from deployments.pipelines.stable_diffusion import StableDiffusionDeployment
    from deployments.standins.tiny import SAFETY_CALIBRATION as cal

    sd = StableDiffusionDeployment(spec(dtype="float32"))
    job = TextToImageJob(cal["prompt"], None, cal["size"], cal["size"], cal["steps"], 7.5,
                         tuple(cal["seeds"])[:8])
    images = asyncio.run(sd.text_to_image(job)).output
    gpu = SafetyCheckerDeployment(spec(name="SafetyChecker", family="safety-checker",
                                       source="tiny:safety-checker"))
    assert gpu.device == "cuda" and gpu.pipe.dtype == torch.float16
    flags = asyncio.run(gpu.check(SafetyJob(), images)).nsfw
    clip_input = gpu.processor(list(images), return_tensors="pt").pixel_values
    cpu = gpu.pipe.to("cpu", torch.float32)
    _, expected = cpu(clip_input=clip_input, images=np.zeros((len(images), 1)))
    assert list(flags) == [bool(f) for f in expected]


# --- LoRA adapters on CUDA: the start probe, fp16, and a compiled UNet ------------------

def lora(name, family="sd21", weight=1.0):
    from deployments.contract import LoraRef

    return LoraRef(name, f"tiny:lora/{family}/{name}", None, weight)


def generate(dep, loras=(), size=256, steps=4):
    from deployments.contract import TextToImageJob

    job = TextToImageJob("a red fox", None, size, size, steps, 7.5, (3,), loras=tuple(loras))
    return asyncio.run(dep.text_to_image(job)).output.astype(int)


@pytest.mark.parametrize("family", ["sd21", "sdxl"])
def test_lora_adapters_load_at_start_and_switch_in_fp16_on_cuda(family):
    from deployments.pipelines.sdxl import SDXLBaseDeployment
    from deployments.pipelines.stable_diffusion import StableDiffusionDeployment

    cls = StableDiffusionDeployment if family == "sd21" else SDXLBaseDeployment
    never = cls(spec(name=family, family=family, source=f"tiny:{family}"))
    # ink is configured: the start-up probe loads it on the GPU and removes it again.
    dep = cls(spec(name=family, family=family, source=f"tiny:{family}", loras=(lora("ink", family),)))
    assert dep.device == "cuda" and dep.pipe.unet.dtype == torch.float16
    plain = generate(never)
    assert np.abs(generate(dep) - plain).max() <= 2  # the probe left the model as loaded
    inked = generate(dep, [lora("ink", family)])
    assert np.abs(inked - plain).mean() > 1.0
    lora_params = [p for n, p in dep.pipe.unet.named_parameters() if "lora_" in n]
    assert lora_params and all(p.device.type == "cuda" and p.dtype == torch.float16 for p in lora_params)
    assert np.abs(generate(dep) - plain).max() <= 2  # LoRA off again: the plain model's pixels
    assert np.abs(generate(dep, [lora("ink", family, 0.5)]) - inked).mean() > 0.5


def test_a_compiled_replica_switches_adapters_without_recompiling_as_an_eager_one_does(monkeypatch):
    import deployments.runtime.loading as loading
    from torch._dynamo.utils import counters
    from deployments.pipelines.stable_diffusion import StableDiffusionDeployment

    # The replica's own path (compiled in place at load, LoRA slots added after); the
    # default mode compiles in seconds where max-autotune takes minutes, through the same
    # Dynamo graphs and guards. Two slots for three adapters: switches copy into slots.
    monkeypatch.setattr(loading, "COMPILE_OPTIONS", {**loading.COMPILE_OPTIONS, "mode": "default"})
    adapters = (lora("ink"), lora("pastel"), lora("grain"))
    torch._dynamo.reset()
    compiled = StableDiffusionDeployment(spec(compile=True, lora_slots=2, loras=adapters))
    eager = StableDiffusionDeployment(spec(lora_slots=2, loras=adapters))
    assert compiled.pipe.unet._compiled_call_impl is not None and compiled.loras.slots.compiled
    # Warm-up: the two graphs of a compiled UNet (every slot on, none on).
    generate(compiled, steps=2), generate(compiled, [lora("ink")], steps=2)
    graphs = counters["stats"]["unique_graphs"]
    sets = [(), (lora("ink"),), (lora("pastel"),), (lora("ink", weight=0.7), lora("pastel", weight=-0.5)), (),
            (lora("grain"),), (lora("ink", weight=0.0),), (lora("grain", weight=-1.0), lora("ink", weight=0.5)),
            (lora("pastel", weight=0.5),), (lora("ink"),), ()]
    images = []
    with torch.compiler.set_stance("fail_on_recompile"):
        for loras in sets:
            fast, slow = generate(compiled, loras, steps=2), generate(eager, loras, steps=2)
            assert np.abs(fast - slow).mean() < 1.0, [(r.name, r.weight) for r in loras]
            images.append(fast)
        # Jobs of different adapters in one call.
        async def mixed(dep):
            from deployments.contract import TextToImageJob

            jobs = [TextToImageJob("a red fox", None, 256, 256, 2, 7.5, (seed,), loras=tuple(loras))
                    for seed, loras in ((3, [lora("ink")]), (4, []), (5, [lora("grain", weight=0.5)]))]
            return await asyncio.gather(*(dep.text_to_image(job) for job in jobs))

        for fast, slow in zip(asyncio.run(mixed(compiled)), asyncio.run(mixed(eager))):
            assert np.abs(fast.output.astype(int) - slow.output.astype(int)).mean() < 1.0
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile across the switches
    assert compiled.loras.slots.swaps >= 3 and compiled.loras.evictions == []
    # Each set gave its own picture; no adapters twice gave the same one.
    assert all(np.abs(images[i] - images[i + 1]).mean() > 1.0 for i in range(3))
    assert np.abs(images[0] - images[4]).mean() < 1.0
    assert np.abs(images[0] - images[6]).mean() < 1.0  # weight 0: the plain model
