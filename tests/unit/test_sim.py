"""The simulated accelerator (``sim:<family>``, benchmarks only): the real deployment
classes around a pipeline that sleeps for an H100's time; called directly (no Ray)."""

import asyncio
import io
import time

import numpy as np
import pytest
from PIL import Image

from deployments.runtime.batching import PipelineCancelled
from deployments.contract import (
    ImageToImageJob, PipelineSpec, RefineJob, SafetyJob, StageResult, TextToImageJob, UpscaleJob,
)
from deployments.pipelines.esrgan import ESRGANDeployment
from deployments.pipelines.latent_upscaler import LatentUpscalerDeployment
from deployments.pipelines.safety import SafetyCheckerDeployment
from deployments.pipelines.sdxl import SDXLBaseDeployment, SDXLRefinerDeployment
from deployments.standins.sim import COSTS, MP, SimPipeline, photo_like
from deployments.pipelines.stable_diffusion import StableDiffusionDeployment
from deployments.pipelines.x4_upscaler import X4UpscalerDeployment
from serve_app.config import ModelConfig


def spec(family, **kw):
    return PipelineSpec(name=family, family=family, source=f"sim:{family}", **kw)


def text_job(seeds, width=768, height=768, steps=4, **kw):
    return TextToImageJob(prompt="a harbour at dawn", negative_prompt=None, width=width,
                          height=height, num_inference_steps=steps, guidance_scale=7.5,
                          seeds=tuple(seeds), **kw)


def upscale_job(seeds=(1,), steps=2):
    return UpscaleJob(prompt="", negative_prompt=None, num_inference_steps=steps,
                      guidance_scale=0.0, seeds=tuple(seeds))


@pytest.fixture(scope="module")
def sd():
    return StableDiffusionDeployment(spec("sd21", max_batch_images=4))


def timed(coro):
    """(result, wall seconds, CPU seconds of this process) of a deployment call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = asyncio.run(coro)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def test_cost_model_reproduces_the_published_h100_latencies():
    # The figures it is fitted to (deployments/standins/sim.py [B] and [C]).
    assert COSTS["sdxl"].call_s(1, 1024 * 1024, 30) == pytest.approx(2.496, rel=1e-3)
    assert COSTS["sd21"].call_s(1, 768 * 768, 50) == pytest.approx(1.39, rel=1e-3)
    # Batching pays a little (SDXL at 1024x1024 fills an H100 at batch 1), never loses.
    sdxl = COSTS["sdxl"]
    rates = [n / sdxl.call_s(n, 1024 * 1024, 30) for n in (1, 2, 4, 8)]
    assert rates == sorted(rates) and 1.1 < rates[-1] / rates[0] < 1.4
    assert sdxl.best_rate(30, 1024 * 1024, 4) == pytest.approx(rates[2])


def test_sim_replica_sleeps_for_the_model_time_without_using_the_cpu(sd):
    asyncio.run(sd.text_to_image(text_job([0])))  # first call makes the image of this size
    charged = sd.pipe.charged_s
    result, wall, cpu = timed(sd.text_to_image(text_job([1], steps=20)))
    expected = COSTS["sd21"].call_s(1, 768 * 768, 20)
    assert isinstance(sd.pipe, SimPipeline) and isinstance(result, StageResult)
    assert result.output.dtype == np.uint8 and result.output.shape == (1, 768, 768, 3)
    # It charged the cost model's time and slept it out (the host's own overhead on a
    # loaded CI machine is not bounded here: wall time only bounds it from below).
    assert sd.pipe.charged_s - charged == pytest.approx(expected)
    assert wall >= expected
    assert cpu < 0.1 * wall, f"a sleeping accelerator used {cpu:.3f} s of CPU in {wall:.3f} s"
    assert result.steps == 20


def test_concurrent_jobs_batch_and_cost_the_batched_time(sd):
    async def four():
        return await asyncio.gather(*(sd.text_to_image(text_job([seed], steps=10)) for seed in range(4)))

    calls, charged = sd.batcher.stats.pipeline_calls, sd.pipe.charged_s
    results, wall, _ = timed(four())
    assert sd.batcher.stats.pipeline_calls == calls + 1
    expected = COSTS["sd21"].call_s(4, 768 * 768, 10)
    assert expected < 4 * COSTS["sd21"].call_s(1, 768 * 768, 10)  # batching pays
    assert sd.pipe.charged_s - charged == pytest.approx(expected)
    assert wall >= expected
    assert expected <= sum(r.seconds for r in results) <= wall  # shares of the one call's time


def test_images_are_deterministic_photo_like_and_seeded(sd):
    a = asyncio.run(sd.text_to_image(text_job([3, 4], 512, 512))).output
    b = asyncio.run(sd.text_to_image(text_job([3], 512, 512))).output
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], a[1])
    # Neighbouring pixels agree (not noise), and the PNG is as large as a photo's.
    pixels = photo_like(1024, 1024)
    assert np.abs(np.diff(pixels, axis=1)).mean() < 0.03
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(buffer, "PNG", compress_level=6)
    assert 1.0e6 < len(buffer.getvalue()) < 2.5e6


def test_a_cancelled_batch_stops_at_the_next_step(sd):
    async def cancel_midway():
        task = asyncio.ensure_future(sd.text_to_image(text_job([1], steps=200)))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The pipeline thread stops at its next step: a new job starts at once.
        return await sd.text_to_image(text_job([2], steps=1))

    stopped = sd.batcher.stats.cancelled_running
    _, wall, _ = timed(cancel_midway())
    assert wall < 1.5, "the cancelled 200-step job (about 5 s) ran on"
    assert sd.batcher.stats.cancelled_running == stopped + 1
    assert PipelineCancelled  # the exception the step callback raised


def test_image_to_image_runs_strength_times_steps(sd):
    image = np.zeros((512, 512, 3), np.uint8)
    job = ImageToImageJob(prompt="p", negative_prompt=None, width=512, height=512,
                          num_inference_steps=40, guidance_scale=7.5, strength=0.25, seeds=(1,))
    charged = sd.pipe.charged_s
    result, wall, _ = timed(sd.image_to_image(job, image))
    assert result.output.shape == (1, 512, 512, 3) and result.steps == 10
    expected = COSTS["sd21"].call_s(1, 512 * 512, 10)
    assert sd.pipe.charged_s - charged == pytest.approx(expected) and wall >= expected
    mask = np.full((512, 512), 255, np.uint8)
    assert asyncio.run(sd.image_to_image(job, image, mask)).output.shape == (1, 512, 512, 3)


def test_sdxl_latents_go_through_the_refiner():
    base, refiner = SDXLBaseDeployment(spec("sdxl")), SDXLRefinerDeployment(spec("sdxl-refiner"))
    latents = asyncio.run(base.text_to_image(
        text_job([1, 2], 1024, 1024, steps=10, denoising_end=0.8, output_latents=True)))
    assert tuple(latents.output.shape) == (2, 4, 128, 128) and latents.latent_space == "sdxl"
    job = RefineJob(prompt="p", negative_prompt=None, num_inference_steps=10, guidance_scale=5,
                    seeds=(1, 2), denoising_start=0.8)
    images = asyncio.run(refiner.refine(job, latents))
    assert images.output.shape == (2, 1024, 1024, 3)
    assert images.steps == 2 * 8 + 2 * 2  # the base's 8 steps and the refiner's 2, per image


def test_upscalers_and_the_checker_keep_their_sizes(sd):
    latents = asyncio.run(sd.text_to_image(text_job([1], 512, 512, output_latents=True)))
    x2 = LatentUpscalerDeployment(spec("sd-x2-latent-upscaler"))
    assert asyncio.run(x2.upscale(upscale_job(), latents)).output.shape == (1, 1024, 1024, 3)
    small = np.zeros((1, 72, 40, 3), np.uint8)
    x4 = X4UpscalerDeployment(spec("sd-x4-upscaler"))
    assert asyncio.run(x4.upscale(upscale_job(), small)).output.shape == (1, 288, 160, 3)
    esrgan = ESRGANDeployment(spec("esrgan"))
    assert asyncio.run(esrgan.upscale(upscale_job(steps=1), small)).output.shape == (1, 144, 80, 3)
    checker = SafetyCheckerDeployment(spec("safety-checker"))
    checked = asyncio.run(checker.check(SafetyJob(), np.zeros((2, 64, 64, 3), np.uint8)))
    assert checked.nsfw == (False, False) and checked.output.shape == (2, 64, 64, 3)


def test_a_sim_source_names_its_own_family():
    base = dict(name="m", family="sd21",
                defaults={"size": "512x512", "num_inference_steps": 20, "guidance_scale": 7.5},
                limits={"sizes": ["512x512"], "max_steps": 50}, batching={"max_batch_images": 4})
    assert ModelConfig(**base, source="sim:sd21").source == "sim:sd21"
    with pytest.raises(ValueError, match="sim:sd21"):
        ModelConfig(**base, source="sim:sdxl")


def test_step_mode_admits_a_job_at_the_next_step_and_charges_each_call_by_rows():
    """The simulated accelerator's step loop: a job arriving mid-batch starts at the next
    step (not after the batch), and every UNet call costs the cost model's time for its rows."""
    xl = SDXLBaseDeployment(spec("sdxl", max_batch_images=8, batching_mode="step", cpu_threads=1))
    cost = COSTS["sdxl"]

    async def scenario():
        first = asyncio.ensure_future(xl.text_to_image(text_job([1], 1024, 1024, steps=30)))
        while xl.steps.stats.unet_calls < 5:
            await asyncio.sleep(0.005)
        second = await xl.text_to_image(TextToImageJob(
            prompt="p", negative_prompt=None, width=1024, height=1024, num_inference_steps=10,
            guidance_scale=1.0, seeds=(2,)))
        return await first, second

    charged = xl.pipe.charged_s
    first, second = asyncio.run(scenario())
    rows = xl.steps.stats.rows
    # The second job's first step is a call of its own (1 row: unguided), then 2 + 1 rows
    # while both run.
    assert rows[:5] == [2] * 5 and rows.count(1) == 1 and rows.count(3) == 9 and len(rows) == 31
    assert rows[rows.index(1) + 1] == 3
    expected = (sum(cost.unet_s(count, MP) for count in rows) + 2 * cost.text_ms / 1000
                + 2 * cost.decode_s(1, MP))
    assert xl.pipe.charged_s - charged == pytest.approx(expected)
    # The second job waited for its text encoding and one step, not for the first job's 25 left.
    first_step_wait = xl.batcher.stats.first_step_waits[-1]
    assert first_step_wait < cost.text_ms / 1000 + 2 * cost.unet_s(3, MP) + 0.5
    assert first_step_wait < 25 * cost.unet_s(2, MP)
    assert second.steps == 10 and first.steps == 30


def test_step_mode_keeps_more_jobs_in_flight_than_a_call_takes_new_ones_first_then_the_oldest():
    """max_batch_images 2: each UNet call takes two guided images; 32 are kept in flight
    (the default, 16x). A job that arrives while four wait starts at the next call (a call of
    its own), and of the four, the two oldest end first."""
    xl = SDXLBaseDeployment(spec("sdxl", max_batch_images=2, batching_mode="step", cpu_threads=1))
    xl.pipe.device.speed = 2.0  # the simulated clock, twice an H100's
    assert (xl.batcher.max_images_in_flight, xl.steps.max_rows) == (32, 4)
    ended: list[int] = []

    async def job(seed):
        await xl.text_to_image(text_job([seed], 1024, 1024, steps=6))
        ended.append(seed)

    async def scenario():
        old = [asyncio.ensure_future(job(seed)) for seed in range(4)]
        while xl.steps.stats.unet_calls < 4:
            await asyncio.sleep(0.001)
        in_flight = len(xl.batcher.in_flight)
        calls = xl.steps.stats.unet_calls
        await job(9)
        await asyncio.gather(*old)
        return in_flight, calls

    in_flight, calls = asyncio.run(scenario())
    assert in_flight == 4  # all four started, though a call takes two
    assert max(xl.steps.stats.rows) == 4 and max(xl.steps.stats.jobs) == 2
    assert set(ended[:2]) == {0, 1} and set(ended[2:]) == {2, 3, 9}  # 0 and 1 end on one step
    # The late job's first step came within a few calls (the next one, less the host's delays),
    # not after the ten calls that the four jobs before it had left.
    wait = xl.batcher.stats.first_step_waits[-1]
    assert wait * xl.pipe.device.speed < 5 * COSTS["sdxl"].unet_s(4, MP)
    assert xl.steps.stats.decoded == 5


def test_lora_flops_are_what_the_flop_counter_counts_for_the_lora_layers_of_a_unet_call():
    """The LoRA row cost (deployments/standins/sim.py lora_flops_per_row) is every LoRA
    matmul of a real UNet call: torch's FLOP counter, adapters on minus off, on a small
    UNet of three levels with cross-attention (its keys and values on the encoder's 77
    tokens) at non-square latents."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from deployments.standins.sim import lora_flops_per_row

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 32), norm_num_groups=4, cross_attention_dim=16,
        attention_head_dim=2, use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")).eval()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"]),
                     adapter_name="slot")

    def flops() -> int:
        sample, context = torch.zeros(1, 4, 16, 8), torch.zeros(1, 77, 16)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(sample, torch.tensor(999), encoder_hidden_states=context)
        return counter.get_total_flops()

    unet.disable_adapters()
    base = flops()
    assert lora_flops_per_row(unet, 16, 8) == 0.0
    unet.enable_adapters()
    assert lora_flops_per_row(unet, 16, 8) == flops() - base > 0


def test_a_sim_unet_call_charges_every_active_lora_slot_for_every_row():
    """On the simulated accelerator a replica's LoRA slots sit in the real UNet (meta
    device): a call pays each active slot's FLOPs for each of its rows, whatever the rows'
    weights (0 for a row without that adapter), and nothing with no adapter."""
    from deployments.contract import LoraRef

    a = LoraRef("a", "sim:lora/sd21/r64-a", None, 1.0)
    b = LoraRef("b", "sim:lora/sd21/r64-b", None, 0.5)
    dep = StableDiffusionDeployment(spec("sd21", max_batch_images=4, loras=(a, b), lora_slots=2))
    assert (dep.loras.slots.rank, len(dep.loras.slots.layers)) == (64, 128)  # SD 2.1's attention projections
    cost, pixels = COSTS["sd21"], 512 * 512
    # One rank-64 slot at 64x64 latents: 64 x 286,107,392 FLOPs a row: the sum over the
    # attention projections of 2 x (in + out) x their input's tokens, as recorded by
    # forward hooks in a pass of the real SD 2.1 UNet (meta device).
    slot = 64 * 286_107_392

    async def together(sets):
        return await asyncio.gather(*(dep.text_to_image(text_job([k], 512, 512, steps=3, loras=loras))
                                      for k, loras in enumerate(sets)))

    for sets, active in (([(), ()], 0), ([(a,), ()], 1), ([(a,), (b,)], 2), ([(a, b), ()], 2)):
        charged = dep.pipe.charged_s
        asyncio.run(together(sets))
        assert dep.batcher.stats.batch_sizes[-1] == 2  # one call of two guided images: 4 rows
        expected = (cost.text_ms / 1000 + 3 * (cost.unet_s(4, pixels) + cost.lora_s(4, active * slot))
                    + cost.decode_s(2, pixels))
        assert dep.pipe.charged_s - charged == pytest.approx(expected), sets
    # Rank 64 on SD 2.1 at 512x512: a few per cent of a row's own step time.
    assert 0.01 < cost.lora_s(1, slot) / (cost.unet_s(2, pixels) - cost.unet_s(1, pixels)) < 0.1
