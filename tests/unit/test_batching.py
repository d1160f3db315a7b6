"""Dynamic batching and cancellation: the Batcher alone, then a real tiny pipeline."""

import asyncio
import threading
import time

import numpy as np
import pytest

from deployments.runtime.batching import Batcher, batch_cancelled
from deployments.contract import PipelineSpec, TextToImageJob
from deployments.pipelines.stable_diffusion import StableDiffusionDeployment


class Job:
    def __init__(self, name, n=1):
        self.name, self.seeds = name, tuple(range(n))


def recording_batcher(max_images=4, wait=0.0, delay=0.0):
    calls = []

    def run_group(kind, entries):
        calls.append((kind, [e.job.name for e in entries]))
        time.sleep(delay)
        return [f"{kind}:{e.job.name}" for e in entries]

    return Batcher(run_group, max_images, wait), calls


async def submit(batcher, name, key, n=1, kind="t2i"):
    return await batcher.submit(kind, Job(name, n), (), key, n)


def test_concurrent_compatible_jobs_share_one_call():
    batcher, calls = recording_batcher()

    async def main():
        return await asyncio.gather(*(submit(batcher, f"j{i}", "512") for i in range(3)))

    assert [r.output for r in asyncio.run(main())] == ["t2i:j0", "t2i:j1", "t2i:j2"]
    assert calls == [("t2i", ["j0", "j1", "j2"])]
    assert batcher.stats.batch_sizes == [3] and batcher.stats.images == 3


def test_incompatible_jobs_run_in_separate_calls_in_arrival_order():
    batcher, calls = recording_batcher()

    async def main():
        return await asyncio.gather(
            submit(batcher, "a", "512"), submit(batcher, "b", "768"), submit(batcher, "c", "512"),
            submit(batcher, "d", "512", kind="i2i"),
        )

    assert [r.output for r in asyncio.run(main())] == ["t2i:a", "t2i:b", "t2i:c", "i2i:d"]
    assert calls == [("t2i", ["a", "c"]), ("t2i", ["b"]), ("i2i", ["d"])]


def test_batches_are_capped_in_images():
    batcher, calls = recording_batcher(max_images=4)

    async def main():
        await asyncio.gather(*(submit(batcher, f"j{i}", "k", n=2) for i in range(5)))

    asyncio.run(main())
    assert [len(names) for _, names in calls] == [2, 2, 1]
    assert batcher.stats.batch_sizes == [4, 4, 2]


def test_a_job_larger_than_the_cap_still_runs_alone():
    batcher, calls = recording_batcher(max_images=2)
    assert asyncio.run(submit(batcher, "big", "k", n=5)).output == "t2i:big"
    assert batcher.stats.batch_sizes == [5]


def test_jobs_arriving_during_a_call_form_the_next_batch():
    batcher, calls = recording_batcher(delay=0.2)

    async def main():
        first = asyncio.ensure_future(submit(batcher, "first", "k"))
        await asyncio.sleep(0.05)  # "first" is running now
        rest = await asyncio.gather(*(submit(batcher, f"late{i}", "k") for i in range(3)))
        return await first, rest

    asyncio.run(main())
    assert calls == [("t2i", ["first"]), ("t2i", ["late0", "late1", "late2"])]


def test_wait_timeout_gathers_a_fuller_batch_in_a_burst():
    batcher, calls = recording_batcher(max_images=8, wait=0.1, delay=0.05)

    async def main():
        first = asyncio.ensure_future(submit(batcher, "a", "k"))  # alone: starts at once
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(submit(batcher, "b", "k"))  # while a runs: a burst
        await asyncio.sleep(0.06)
        third = asyncio.ensure_future(submit(batcher, "c", "k"))  # after a ended: joins b
        return await asyncio.gather(first, second, third)

    asyncio.run(main())
    assert calls == [("t2i", ["a"]), ("t2i", ["b", "c"])]


def test_a_lone_job_does_not_wait_for_company():
    batcher, calls = recording_batcher(max_images=8, wait=0.5)

    async def main():
        started = time.monotonic()
        for name in ("a", "b", "c"):  # a client that sends the next when answered
            await submit(batcher, name, "k")
        return time.monotonic() - started

    assert asyncio.run(main()) < 0.25
    assert calls == [("t2i", ["a"]), ("t2i", ["b"]), ("t2i", ["c"])]


def test_a_cancelled_queued_job_never_runs():
    batcher, calls = recording_batcher(delay=0.2)

    async def main():
        first = asyncio.ensure_future(submit(batcher, "first", "k"))
        await asyncio.sleep(0.05)
        doomed = asyncio.ensure_future(submit(batcher, "doomed", "other"))
        await asyncio.sleep(0.01)
        doomed.cancel()
        await first
        with pytest.raises(asyncio.CancelledError):
            await doomed

    asyncio.run(main())
    assert calls == [("t2i", ["first"])] and batcher.stats.cancelled_before_start == 1


def test_errors_reach_every_caller_of_the_batch():
    def run_group(kind, entries):
        raise RuntimeError("boom")

    batcher = Batcher(run_group, 4)

    async def main():
        return await asyncio.gather(submit(batcher, "a", "k"), submit(batcher, "b", "k"),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)


def adapter_batcher(max_adapters, max_images=8):
    calls = []

    def run_group(kind, entries):
        calls.append([e.job.name for e in entries])
        return [e.job.name for e in entries]

    return Batcher(run_group, max_images, max_adapters=max_adapters), calls


async def submit_with(batcher, name, *adapters, key="k"):
    return await batcher.submit("t2i", Job(name), (), key, 1, adapters=frozenset(adapters))


def test_jobs_of_different_adapters_share_a_call_within_the_adapter_slots():
    batcher, calls = adapter_batcher(max_adapters=2)

    async def main():
        return await asyncio.gather(
            submit_with(batcher, "a1", "a"), submit_with(batcher, "b", "b"), submit_with(batcher, "c", "c"),
            submit_with(batcher, "plain"), submit_with(batcher, "a2", "a"),
            submit_with(batcher, "ab", "a", "b"), submit_with(batcher, "cd", "c", "d"))

    assert [r.output for r in asyncio.run(main())] == ["a1", "b", "c", "plain", "a2", "ab", "cd"]
    # c waits while a and b hold both slots; jobs of a and b, and jobs of none, still join.
    # Then c, and cd (c held: one more fits).
    assert calls == [["a1", "b", "plain", "a2", "ab"], ["c", "cd"]]


def test_without_an_adapter_bound_adapters_never_split_a_batch():
    batcher, calls = adapter_batcher(max_adapters=None)

    async def main():
        await asyncio.gather(*(submit_with(batcher, name, name) for name in "abcde"))

    asyncio.run(main())
    assert calls == [list("abcde")]


def test_a_job_whose_adapters_do_not_fit_beside_the_head_runs_in_the_next_call():
    batcher, calls = adapter_batcher(max_adapters=2)

    async def main():
        await asyncio.gather(submit_with(batcher, "a", "a"), submit_with(batcher, "bc", "b", "c"),
                             submit_with(batcher, "a2", "a"))

    asyncio.run(main())
    assert calls == [["a", "a2"], ["bc"]]


def test_an_error_result_fails_its_own_job_and_the_others_get_theirs():
    def run_group(kind, entries):
        return [ValueError(f"{e.job.name}'s adapter") if e.job.name == "bad" else e.job.name
                for e in entries]

    batcher = Batcher(run_group, 4, max_adapters=3)

    async def main():
        return await asyncio.gather(submit_with(batcher, "a", "a"), submit_with(batcher, "bad", "x"),
                                    submit_with(batcher, "plain"), return_exceptions=True)

    a, bad, plain = asyncio.run(main())
    assert (a.output, plain.output) == ("a", "plain")
    assert isinstance(bad, ValueError) and str(bad) == "bad's adapter"
    assert batcher.stats.batch_sizes == [3]


def test_batch_cancelled_needs_every_token():
    class Entry:
        def __init__(self):
            self.token = threading.Event()

    entries = [Entry(), Entry()]
    entries[0].token.set()
    assert not batch_cancelled(entries)
    entries[1].token.set()
    assert batch_cancelled(entries)


# --- a real tiny pipeline -------------------------------------------------------------


@pytest.fixture(scope="module")
def sd():
    return StableDiffusionDeployment(
        PipelineSpec(name="sd", family="sd21", source="tiny:sd21", max_batch_images=8)
    )


def job(seeds, steps=2, width=128, height=128, negative=None):
    return TextToImageJob("a red fox", negative, width, height, steps, 7.5, tuple(seeds))


def test_batched_results_equal_unbatched_results(sd):
    async def batched():
        return await asyncio.gather(
            sd.text_to_image(job([10, 11])), sd.text_to_image(job([12])), sd.text_to_image(job([13]))
        )

    calls_before = sd.batcher.stats.pipeline_calls
    together = [r.output for r in asyncio.run(batched())]
    assert sd.batcher.stats.pipeline_calls == calls_before + 1  # one pipeline call for all
    assert sd.batcher.stats.batch_sizes[-1] == 4
    alone = [asyncio.run(sd.text_to_image(job([seed]))).output for seed in (10, 11, 12, 13)]
    together_images = [*together[0], together[1][0], together[2][0]]
    for mixed, single in zip(together_images, alone):
        assert np.abs(mixed.astype(int) - single[0].astype(int)).max() <= 2


def test_incompatible_jobs_are_not_mixed(sd):
    async def mixed():
        return await asyncio.gather(
            sd.text_to_image(job([1], width=128)),
            sd.text_to_image(job([1], width=192)),
            sd.text_to_image(job([1], steps=3)),
            sd.text_to_image(job([1], negative="blurry")),
        )

    calls_before = sd.batcher.stats.pipeline_calls
    shapes = [r.output.shape for r in asyncio.run(mixed())]
    assert sd.batcher.stats.pipeline_calls == calls_before + 4
    assert shapes == [(1, 128, 128, 3), (1, 128, 192, 3), (1, 128, 128, 3), (1, 128, 128, 3)]


def test_a_cancelled_generation_stops_at_the_next_step(sd):
    steps = 200  # about 10 s on this machine if it ran to the end

    async def main():
        task = asyncio.ensure_future(sd.text_to_image(job([1], steps=steps, width=256, height=256)))
        while sd.batcher.stats.steps == steps_before:
            await asyncio.sleep(0.01)
        task.cancel()
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The slot is free again: the next job starts and finishes promptly.
        await sd.text_to_image(job([2]))
        return time.monotonic() - started

    steps_before = sd.batcher.stats.steps
    cancelled_before = sd.batcher.stats.cancelled_running
    elapsed = asyncio.run(main())
    assert sd.batcher.stats.cancelled_running == cancelled_before + 1
    assert sd.batcher.stats.steps - steps_before < steps // 4
    assert elapsed < 5


def test_a_batch_shares_its_cost_by_images(sd):
    async def batched():
        return await asyncio.gather(sd.text_to_image(job([1, 2, 3], steps=3)),
                                    sd.text_to_image(job([4], steps=3)))

    three, one = asyncio.run(batched())
    assert (three.steps, one.steps) == (9, 3)
    assert three.seconds == pytest.approx(3 * one.seconds)


def test_stats_are_reported(sd):
    stats = asyncio.run(sd.stats())
    assert {"pipeline_calls", "images", "batch_sizes", "cancelled_running", "steps"} <= set(stats)


def test_streaming_yields_previews_then_the_result(sd):
    from deployments.contract import StageResult
    from deployments.runtime.previews import preview_steps

    async def collect(partial_images):
        events = []
        async for event in sd.stream(job([7], steps=8, width=128, height=96),
                                     partial_images=partial_images):
            events.append(event)
        return events

    for partial_images in (0, 1, 3):
        events = asyncio.run(collect(partial_images))
        partials, (final,) = events[:-1], events[-1:]
        assert [e[1] for e in partials] == list(range(partial_images))
        assert all(e[0] == "partial" and e[2].shape == (12, 16, 3) for e in partials)
        assert final[0] == "final" and isinstance(final[1], StageResult)
        assert final[1].output.shape == (1, 96, 128, 3)
    assert preview_steps(8, 3) == [1, 3, 5] and preview_steps(1, 2) == [] and preview_steps(4, 0) == []


def test_a_preview_decoder_gives_full_resolution_previews():
    from diffusers import AutoencoderTiny

    sd = StableDiffusionDeployment(PipelineSpec(name="sd", family="sd21", source="tiny:sd21",
                                                preview_decoder="tiny:taesd"))
    assert isinstance(sd.preview_decoder, AutoencoderTiny)

    async def collect():
        return [event async for event in sd.stream(
            job([7], steps=6, width=128, height=96), partial_images=2)]

    *partials, final = asyncio.run(collect())
    # TAESD decodes at the image's own resolution, not the latent's (12x16).
    assert [e[2].shape for e in partials] == [(96, 128, 3)] * 2
    assert all(e[2].dtype == np.uint8 and e[2].std() > 0 for e in partials)
    assert final[1].output.shape == (1, 96, 128, 3)
