"""Step-level batching (deployments/runtime/steploop.py): admission on a fake job runner, then the
tiny SD 2.1 and SDXL replicas in step mode against the same jobs run alone (``pipe(...)``
through a request-mode replica): same pixels whatever ran beside them."""

import asyncio
import threading
import time
from multiprocessing.pool import ThreadPool

import numpy as np
import pytest

from deployments.contract import ImageToImageJob, PipelineSpec, RefineJob, TextToImageJob
from deployments.pipelines.sdxl import SDXLBaseDeployment, SDXLRefinerDeployment
from deployments.pipelines.stable_diffusion import StableDiffusionDeployment
from deployments.runtime.steploop import StepBatcher

# --- admission, on a fake job runner ---------------------------------------------------------


class FakeJobs:
    """run_job for a StepBatcher: each job holds its thread for ``seconds`` (job.payload)."""

    def __init__(self):
        self.started: list[tuple[str, float]] = []
        self.lock = threading.Lock()

    def __call__(self, entry):
        with self.lock:
            self.started.append((entry.job, time.monotonic()))
        time.sleep(0.2)
        return entry.job, 1, 0.2


def batcher(max_images=4, max_wait=10.0):
    return StepBatcher(FakeJobs(), max_images, max_wait)


def test_jobs_of_the_running_cohort_join_it_and_others_wait_for_it_to_drain():
    steps = batcher()

    async def scenario():
        first = asyncio.ensure_future(steps.submit("text_to_image", "a1", (), "A", 1))
        await asyncio.sleep(0.05)
        other = asyncio.ensure_future(steps.submit("text_to_image", "b1", (), "B", 1))
        late = asyncio.ensure_future(steps.submit("image_to_image", "a2", (), "A", 1))  # kinds share
        await asyncio.sleep(0.05)
        in_flight = [entry.job for entry in steps.in_flight]
        await asyncio.gather(first, other, late)
        return in_flight

    assert asyncio.run(scenario()) == ["a1", "a2"]  # a2 joined; b1 waited
    order = [job for job, _ in steps.run_job.started]
    assert order == ["a1", "a2", "b1"]


def test_the_images_in_flight_stay_within_the_budget():
    steps = batcher(max_images=4)

    async def scenario():
        jobs = [asyncio.ensure_future(steps.submit("text_to_image", f"j{i}", (), "A", 2)) for i in range(3)]
        await asyncio.sleep(0.05)
        in_flight = sum(entry.images for entry in steps.in_flight)
        await asyncio.gather(*jobs)
        return in_flight

    assert asyncio.run(scenario()) == 4


def test_a_job_larger_than_the_budget_runs_alone():
    steps = batcher(max_images=2)
    assert asyncio.run(steps.submit("text_to_image", "big", (), "A", 5)).output == "big"


def test_another_shape_waits_at_most_the_bound_behind_a_stream_of_one_shape():
    steps = batcher(max_images=2, max_wait=0.3)

    async def scenario():
        tasks = [asyncio.ensure_future(steps.submit("text_to_image", "a0", (), "A", 1))]
        await asyncio.sleep(0.01)
        submitted = time.monotonic()
        tasks.append(asyncio.ensure_future(steps.submit("text_to_image", "b", (), "B", 1)))
        for i in range(1, 20):  # A keeps coming, faster than jobs end
            tasks.append(asyncio.ensure_future(steps.submit("text_to_image", f"a{i}", (), "A", 1)))
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
        return submitted

    submitted = asyncio.run(scenario())
    started = dict(steps.run_job.started)
    # Past 0.3 s no A job joins; the B job starts once the A jobs in flight (0.2 s) end.
    assert started["b"] - submitted < 0.3 + 0.2 + 0.2
    assert sum(1 for job, at in steps.run_job.started if job.startswith("a") and at > started["b"]) >= 5


def test_jobs_of_other_adapters_join_within_the_slots_and_the_others_wait_for_a_free_one():
    steps = StepBatcher(FakeJobs(), 8, 10.0, max_adapters=2)

    async def scenario():
        def submit(name, *adapters, key="A"):
            return asyncio.ensure_future(steps.submit("text_to_image", name, (), key, 1,
                                                      adapters=frozenset(adapters)))

        first = submit("a1", "a")
        await asyncio.sleep(0.05)
        # a1 runs (0.2 s); b joins (two slots), c waits, plain and ab join (no new adapter).
        tasks = [first, submit("b", "b"), submit("c", "c"), submit("plain"), submit("ab", "a", "b")]
        await asyncio.sleep(0.05)
        in_flight = [entry.job for entry in steps.in_flight]
        await asyncio.gather(*tasks)
        return in_flight

    assert asyncio.run(scenario()) == ["a1", "b", "plain", "ab"]
    order = [job for job, _ in steps.run_job.started]
    assert order[-1] == "c"  # once the jobs holding a slot drained


def test_a_job_whose_adapters_do_not_fit_waits_at_most_the_bound_behind_a_stream_of_others():
    steps = StepBatcher(FakeJobs(), 2, 0.3, max_adapters=1)

    async def scenario():
        def submit(name, *adapters):
            return asyncio.ensure_future(steps.submit("text_to_image", name, (), "A", 1,
                                                      adapters=frozenset(adapters)))

        tasks = [submit("a0", "a")]
        await asyncio.sleep(0.01)
        submitted = time.monotonic()
        tasks.append(submit("b", "b"))
        for i in range(1, 20):  # jobs of adapter a keep coming, faster than jobs end
            tasks.append(submit(f"a{i}", "a"))
            await asyncio.sleep(0.05)
        await asyncio.gather(*tasks)
        return submitted

    submitted = asyncio.run(scenario())
    started = dict(steps.run_job.started)
    # Past 0.3 s no job of a joins; b starts once those in flight (0.2 s) end.
    assert started["b"] - submitted < 0.3 + 0.2 + 0.2
    assert sum(1 for job, at in steps.run_job.started if job.startswith("a") and at > started["b"]) >= 5


def test_a_cancelled_queued_job_never_starts():
    steps = batcher(max_images=1)

    async def scenario():
        first = asyncio.ensure_future(steps.submit("text_to_image", "first", (), "A", 1))
        gone = asyncio.ensure_future(steps.submit("text_to_image", "gone", (), "B", 1))
        await asyncio.sleep(0.05)
        gone.cancel()
        await first
        await asyncio.sleep(0.3)

    asyncio.run(scenario())
    assert [job for job, _ in steps.run_job.started] == ["first"]
    assert steps.stats.cancelled_before_start == 1


def test_a_failing_unet_call_fails_its_jobs_and_the_loop_goes_on():
    import torch

    from deployments.runtime.steploop import StepLoop, StepSlot

    calls = []

    def unet(sample, timestep, return_dict=False, **kwargs):
        calls.append(timestep.tolist())
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access")
        return (sample * 2,)

    loop = StepLoop(unet, "fake", max_rows=4)

    def job(value):
        slot = StepSlot(cancelled=lambda: False)
        sample = torch.full((2, 1), value)
        return loop.join(slot, lambda: loop.unet_call(slot, sample, torch.tensor(7), None, {}))

    with pytest.raises(RuntimeError, match="CUDA error"):
        job(1.0)
    assert job(3.0).tolist() == [[6.0], [6.0]]
    assert calls[-1] == [7, 7]  # the job's timestep, once per row


def waiting(rows, arrived, calls, width=8):
    import torch

    from deployments.runtime.steploop import StepSlot

    slot = StepSlot(cancelled=lambda: False, arrived=arrived)
    slot.calls = calls
    slot.request = (torch.zeros(rows, 4, width, width), torch.tensor(1), {})
    return slot


def test_a_call_takes_new_jobs_alone_else_the_oldest_within_its_rows():
    from deployments.runtime.steploop import StepLoop

    loop = StepLoop(lambda *a, **k: None, "fake", max_rows=6)
    old, older, new, newer = (waiting(2, 2.0, 5), waiting(2, 1.0, 9), waiting(2, 4.0, 0),
                              waiting(2, 3.0, 0))
    # The two that have not stepped yet (by arrival) take a short call of their own; the
    # others wait between two of their steps.
    assert loop._choose([old, older, new, newer]) == [newer, new]
    # Then the oldest first, up to the rows.
    young = waiting(2, 5.0, 1)
    assert loop._choose([old, young, older, waiting(2, 6.0, 2)]) == [older, old, young]
    # A job too large for what is left lets a smaller one behind it fill the call.
    big, small = waiting(6, 5.0, 3), waiting(1, 6.0, 3)
    assert loop._choose([older, big, small]) == [older, small]
    # One call, one signature; the first job's; a job larger than the call runs alone.
    other = waiting(2, 0.5, 1, width=16)
    assert loop._choose([older, other, old]) == [other]
    huge = waiting(8, 1.0, 0)
    assert loop._choose([huge, old]) == [huge]


class FakeVAE:
    dtype = None

    def __init__(self, log):
        import torch

        self.dtype, self.log = torch.float32, log

    def decode(self, latents, return_dict=False):
        self.log.append(("decode", latents[:, 0].tolist()))
        return (latents,)


def test_a_job_that_arrives_during_a_call_takes_the_next_one_before_the_decodes():
    import torch

    from deployments.runtime.steploop import StepLoop, StepSlot

    log, gate = [], threading.Event()

    def unet(sample, timestep, return_dict=False, **kwargs):
        log.append(("unet", sample[:, 0].tolist()))
        if len(log) == 2:
            gate.wait(10)  # the second call is in progress when the new job comes
        return (sample,)

    loop, vae = StepLoop(unet, "fake", max_rows=4), FakeVAE(log)

    def job(value, prepare):
        slot = StepSlot(cancelled=lambda: False, arrived=time.monotonic())

        def work():
            time.sleep(prepare)  # its text encoders, on the device
            sample = torch.full((1, 1), value)
            for _ in range(2):
                sample = loop.unet_call(slot, sample, torch.tensor(1), None, {})
            return loop.decode_call(slot, vae, sample, torch.float32)

        return loop.join(slot, work)

    with ThreadPool(2) as pool:
        first = pool.apply_async(job, (1.0, 0.0))
        while len(log) < 2:
            time.sleep(0.005)
        second = pool.apply_async(job, (10.0, 0.1))
        while len(loop._slots) < 2:
            time.sleep(0.005)
        gate.set()
        first.get(10), second.get(10)
    # The new job prepared while the first stepped, took the very next call, and that call
    # went before the first job's decode (which waited one step).
    assert log == [("unet", [1.0]), ("unet", [1.0]), ("unet", [10.0]), ("decode", [1.0]),
                   ("unet", [10.0]), ("decode", [10.0])]


def test_a_job_whose_caller_goes_while_it_waits_its_turn_leaves_at_the_next_boundary():
    """Oldest first, one job a call: the younger job waits between two of its steps; when
    its caller goes it is answered at the next step boundary, not when its turn comes."""
    import torch

    from deployments.runtime.batching import PipelineCancelled
    from deployments.runtime.steploop import StepLoop, StepSlot

    log, gate, gone = [], threading.Event(), threading.Event()

    def unet(sample, timestep, return_dict=False, **kwargs):
        log.append(sample[:, 0].tolist())
        if len(log) == 3:
            gate.wait(10)
        return (sample,)

    loop = StepLoop(unet, "fake", max_rows=2)

    def job(value, arrived, cancelled):
        slot = StepSlot(cancelled=cancelled, arrived=arrived)

        def work():
            sample = torch.full((2, 1), value)
            for _ in range(5):
                sample = loop.unet_call(slot, sample, torch.tensor(1), None, {})
            return sample

        return loop.join(slot, work)

    with ThreadPool(2) as pool:
        old = pool.apply_async(job, (1.0, 1.0, lambda: False))
        young = pool.apply_async(job, (2.0, 2.0, gone.is_set))
        while len(log) < 3:
            time.sleep(0.005)
        gone.set()  # during the old job's second step
        gate.set()
        with pytest.raises(PipelineCancelled):
            young.get(10)
        assert old.get(10).tolist() == [[1.0], [1.0]]
    # Each job's first step alone, then the old job's five: the young one took no second.
    assert sum(call == [2.0, 2.0] for call in log) == 1 and len(log) == 6


# --- the tiny models -------------------------------------------------------------------------

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 255, (128, 128, 3), dtype=np.uint8)
MASK = np.zeros((128, 128), np.uint8)
MASK[32:96, 32:96] = 255


def spec(family, name, **kw):
    return PipelineSpec(name=name, family=family, source=f"tiny:{family}", **kw)


@pytest.fixture(scope="module", params=["sd21", "sdxl"])
def pair(request):
    """(alone, stepped): one family's tiny model in request mode and in step mode."""
    cls = {"sd21": StableDiffusionDeployment, "sdxl": SDXLBaseDeployment}[request.param]
    return (cls(spec(request.param, "alone")),
            cls(spec(request.param, "stepped", batching_mode="step", max_batch_images=8)))


def t2i(seed, steps, guidance, n=1, **kw):
    return TextToImageJob("a red fox", None, 128, 128, steps, guidance, tuple(range(seed, seed + n)), **kw)


def i2i(seed, steps, guidance, strength, negative="blurry"):
    return ImageToImageJob(prompt="a fox in the snow", negative_prompt=negative, width=128, height=128,
                           num_inference_steps=steps, guidance_scale=guidance, strength=strength,
                           seeds=(seed,))


async def staggered(calls, loop_stats, every=2):
    """Start each call once the step loop has run ``every`` more UNet calls: each job
    joins a batch already in flight, at a different step of it."""
    tasks = []
    for call in calls:
        target = loop_stats.unet_calls + every
        tasks.append(asyncio.ensure_future(call()))
        while loop_stats.unet_calls < target and not all(t.done() for t in tasks):
            await asyncio.sleep(0.005)
    return await asyncio.gather(*tasks)


def max_diff(a, b) -> float:
    if hasattr(a, "numpy"):
        return float((a - b).abs().max())
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_mixed_jobs_share_unet_calls_and_keep_the_pixels_they_have_alone(pair):
    alone, stepped = pair

    def calls(d):
        return [
            lambda: d.text_to_image(t2i(1, 9, 7.5)),
            lambda: d.text_to_image(t2i(2, 6, 3.0, n=2)),
            lambda: d.image_to_image(i2i(3, 8, 5.0, 0.5), IMAGE),  # enters at step 4 of 8
            lambda: d.text_to_image(t2i(4, 4, 7.5)),
            lambda: d.image_to_image(i2i(5, 6, 7.5, 0.9, negative=None), IMAGE, MASK),  # inpainting
            lambda: d.text_to_image(t2i(6, 5, 1.0)),  # guidance off: one row an image
        ]

    expected = [asyncio.run(call()) for call in calls(alone)]
    stats = stepped.steps.stats
    calls_before = stats.unet_calls
    got = asyncio.run(staggered(calls(stepped), stats))
    for want, have in zip(expected, got):
        assert max_diff(want.output, have.output) <= 2
        assert have.steps == want.steps
    rows = stats.rows[calls_before - stats.unet_calls:]
    jobs = stats.jobs[calls_before - stats.unet_calls:]
    assert max(jobs) >= 3 and jobs[0] == 1, jobs  # joined mid-flight, several at once
    # Rows: 2 a guided image, 1 for the unguided job's image, the only odd count.
    assert max(rows) <= 2 + 4 + 2 + 2 + 2 + 1 and any(count % 2 for count in rows), rows
    assert len(rows) < sum(have.steps for have in got)  # fewer UNet calls than steps alone


def test_the_sdxl_base_hands_latents_to_a_stepped_refiner():
    base = SDXLBaseDeployment(spec("sdxl", "base"))
    latents = asyncio.run(base.text_to_image(t2i(5, 10, 6.0, output_latents=True, denoising_end=0.8)))
    alone = SDXLRefinerDeployment(spec("sdxl-refiner", "refiner-alone"))
    stepped = SDXLRefinerDeployment(spec("sdxl-refiner", "refiner-stepped", batching_mode="step"))
    jobs = [RefineJob(prompt="a fox", negative_prompt=None, num_inference_steps=20, guidance_scale=6.0,
                      denoising_start=0.5, seeds=(5,)),
            RefineJob(prompt="a cat", negative_prompt=None, num_inference_steps=12, guidance_scale=5.0,
                      denoising_start=0.6, seeds=(5,))]
    expected = [asyncio.run(alone.refine(job, latents)).output for job in jobs]
    got = asyncio.run(staggered([lambda j=j: stepped.refine(j, latents) for j in jobs],
                                stepped.steps.stats, every=1))
    assert all(max_diff(want, have.output) <= 2 for want, have in zip(expected, got))
    assert max(stepped.steps.stats.jobs) == 2


def test_a_cancelled_job_leaves_at_its_next_step_and_the_others_go_on(pair):
    alone, stepped = pair
    keep = t2i(7, 8, 7.5)
    expected = asyncio.run(alone.text_to_image(keep)).output

    async def scenario():
        kept = asyncio.ensure_future(stepped.text_to_image(keep))
        doomed = asyncio.ensure_future(stepped.text_to_image(t2i(8, 200, 7.5)))
        start = stepped.steps.stats.unet_calls
        while stepped.steps.stats.unet_calls < start + 3:
            await asyncio.sleep(0.005)
        doomed.cancel()
        result = await kept
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return result

    cancelled = stepped.batcher.stats.cancelled_running
    result = asyncio.run(scenario())
    assert max_diff(expected, result.output) <= 2
    deadline = time.monotonic() + 10
    while stepped.batcher.stats.cancelled_running == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)  # the doomed job's thread leaves at its next step
    assert stepped.batcher.stats.cancelled_running == cancelled + 1
    assert not stepped.batcher.in_flight


def test_usage_shares_each_unet_call_by_rows(pair):
    _, stepped = pair

    async def two():
        return await asyncio.gather(stepped.text_to_image(t2i(9, 6, 7.5)),
                                    stepped.text_to_image(t2i(10, 6, 1.0)))

    guided, unguided = asyncio.run(two())
    assert guided.steps == unguided.steps == 6
    assert guided.seconds > unguided.seconds > 0  # two rows a step against one


def test_each_job_streams_its_own_previews(pair):
    _, stepped = pair

    async def collect(job):
        return [item async for item in stepped.stream(job, partial_images=2)]

    async def both():
        return await asyncio.gather(collect(t2i(11, 6, 7.5)), collect(t2i(12, 4, 3.0)))

    for items in asyncio.run(both()):
        partial = [item for item in items if item[0] == "partial"]
        assert len(partial) == 2 and items[-1][0] == "final"
        assert partial[0][2].shape == (16, 16, 3)  # linear previews: one pixel a latent


def test_jobs_with_other_adapters_share_calls_and_keep_their_pixels():
    from deployments.contract import LoraRef

    ink = (LoraRef("a", "tiny:lora/sd21/a", None, 1.0),)
    half = (LoraRef("a", "tiny:lora/sd21/a", None, 0.5),)
    alone = StableDiffusionDeployment(spec("sd21", "lora-alone"))
    stepped = StableDiffusionDeployment(spec("sd21", "lora-stepped", batching_mode="step"))
    jobs = [t2i(21, 8, 7.5, loras=ink), t2i(22, 6, 7.5), t2i(23, 6, 5.0, loras=half)]
    expected = [asyncio.run(alone.text_to_image(job)).output for job in jobs]
    stats = stepped.steps.stats
    calls = stats.unet_calls

    async def scenario():
        tasks = []
        for job in jobs:
            tasks.append(asyncio.ensure_future(stepped.text_to_image(job)))
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        in_flight = [entry.job.seeds[0] for entry in stepped.batcher.in_flight]
        return in_flight, await asyncio.gather(*tasks)

    in_flight, got = asyncio.run(scenario())
    assert in_flight == [21, 22, 23]  # adapters and weights do not split the cohort
    assert max(stats.jobs[-(stats.unet_calls - calls):]) == 3  # the three shared UNet calls
    assert all(max_diff(want, have.output) <= 2 for want, have in zip(expected, got))
    assert np.abs(got[0].output.astype(int) - asyncio.run(
        stepped.text_to_image(t2i(21, 8, 7.5))).output.astype(int)).mean() > 1  # the adapter ran


def test_jobs_that_finish_together_decode_in_one_call(pair):
    alone, stepped = pair
    jobs = [t2i(31, 5, 7.5), t2i(32, 5, 3.0, n=2), t2i(34, 5, 1.0)]
    expected = [asyncio.run(alone.text_to_image(job)).output for job in jobs]
    stats = stepped.steps.stats
    calls, decoded = stats.decode_calls, stats.decoded

    async def together():
        return await asyncio.gather(*(stepped.text_to_image(job) for job in jobs))

    got = asyncio.run(together())
    assert all(max_diff(want, have.output) <= 2 for want, have in zip(expected, got))
    assert stats.decoded - decoded == 4
    assert stats.decode_calls - calls < 3, "no two of the jobs ended on the same step"


def test_a_job_that_upcasts_the_vae_decodes_in_float32_and_leaves_it_in_float16():
    """SDXL's VAE overflows in float16 (force_upcast): its pipeline casts the VAE to float32
    to decode and back. In step mode the cast is the job's own; the shared VAE is float16
    between calls, and the image is the one the pipeline gives alone."""
    import torch

    half = dict(cpu_dtype="float16")
    alone = SDXLBaseDeployment(spec("sdxl", "half-alone", **half))
    stepped = SDXLBaseDeployment(spec("sdxl", "half-stepped", batching_mode="step", **half))
    assert stepped.pipe.vae.dtype == torch.float16 and stepped.pipe.vae.config.force_upcast
    jobs = [t2i(41, 4, 6.0), t2i(42, 6, 6.0)]
    expected = [asyncio.run(alone.text_to_image(job)).output for job in jobs]

    async def both():
        return await asyncio.gather(*(stepped.text_to_image(job) for job in jobs))

    got = asyncio.run(both())
    assert all(max_diff(want, have.output) <= 2 for want, have in zip(expected, got))
    assert stepped.pipe.vae.dtype == torch.float16
    assert stepped.steps.stats.decoded >= 2
