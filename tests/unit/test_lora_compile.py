"""A compiled UNet is never recompiled when requests change LoRA adapters or weights.

A tiny SD 2.1 replica whose UNet is compiled in place as ``load_pipeline`` compiles it on
CUDA (``pipe.unet.compile(**COMPILE_OPTIONS)``, before the replica makes its LoRA slots),
here on the CPU. After a warm-up that runs each batch shape with the slots on and off,
requests switch adapters, weights (0, 0.5, 1, negative), combinations, mixed-adapter
batches and no-adapter batches, with slot copies and evictions between them, under
``torch.compiler.set_stance("fail_on_recompile")``: any recompile fails the job, and
Dynamo's graph count must not move. Every image equals an eager replica's within 2/255.

Two backends, the same Dynamo graphs and guards (what decides a recompile):
``aot_eager`` (seconds) and ``inductor`` as on CUDA, whose C++ kernels take minutes to
build on two CPU cores; its SIMD code is turned off here (``cpp.vec_isa_ok``): the
scalar kernels build faster, and vectorisation does not decide a guard.
"""

import asyncio
import time

import numpy as np
import pytest
import torch

from deployments.contract import LoraRef, PipelineSpec, TextToImageJob
from deployments.pipelines.stable_diffusion import StableDiffusionDeployment
from deployments.runtime.loading import COMPILE_OPTIONS
from deployments.runtime.lora_slots import SLOT_PREFIX

SIZE = 64
# Reported with -s: compile seconds, per-call seconds compiled and eager, recompiles.
FIGURES: dict[str, dict] = {}


def ref(name, weight=1.0):
    return LoraRef(name, f"tiny:lora/sd21/{name}", None, weight)


def t2i(loras=(), seeds=(1,), guidance=7.5):
    return TextToImageJob(prompt="a red fox", negative_prompt=None, width=SIZE, height=SIZE,
                          num_inference_steps=1, guidance_scale=guidance, seeds=tuple(seeds),
                          loras=tuple(loras))


def spec():
    # Three configured adapters for two slots, two of them loaded at once: the switches
    # below copy adapters into slots and evict (the text encoders' parts too).
    return PipelineSpec(name="sd", family="sd21", source="tiny:sd21", lora_slots=2, max_loaded_loras=2,
                        loras=(ref("ink"), ref("pastel"), ref("grain")))


def compiled_replica(backend: str) -> StableDiffusionDeployment:
    options = {**COMPILE_OPTIONS, "mode": "default"} if backend == "inductor" else {
        key: value for key, value in COMPILE_OPTIONS.items() if key != "mode"}
    options["backend"] = backend

    class Compiled(StableDiffusionDeployment):
        def load(self, spec):
            # load_pipeline's CUDA path: compiled in place after loading and probing, before
            # the replica's LoRA cache adds the slots.
            pipe, device = super().load(spec)
            pipe.unet.compile(**options)
            return pipe, device

    return Compiled(spec())


def run_batch(dep, jobs):
    """The jobs submitted together (one batch when the pipeline thread is free)."""
    async def together():
        return await asyncio.gather(*(dep.text_to_image(job) for job in jobs))

    return [result.output for result in asyncio.run(together())]


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# Warm-up: each batch shape of the switches with the slots on and with them off (a
# compiled UNet has two graphs: every slot on, or none). Dynamic shapes: batches of two
# rows and more share a graph.
WARM_UP = [
    [t2i()],
    [t2i([ref("ink")])],
    [t2i(seeds=(1, 2)), t2i()],
    [t2i([ref("ink")], seeds=(1, 2)), t2i([ref("ink")])],
]

# At least ten switches, each a batch: adapters, weights 0, 0.5, 1 and negative,
# combinations, jobs of different adapters in one call, no adapter, unguided.
SWITCHES = [
    [t2i([ref("pastel", 0.5)])],
    [t2i([ref("ink", 0.7), ref("pastel", -0.5)])],
    [t2i()],
    [t2i([ref("grain")])],  # a third adapter: copied into a slot, ink evicted
    [t2i([ref("ink")]), t2i(seeds=(2,)), t2i([ref("grain", 0.5)], seeds=(3,))],
    [t2i([ref("ink", 0.0)])],
    [t2i([ref("grain", -1.0)], seeds=(4, 5))],
    [t2i([ref("pastel"), ref("ink", 0.5)]), t2i([ref("pastel", -0.5)], seeds=(6,))],
    [t2i(seeds=(1, 2))],
    [t2i([ref("ink")], seeds=(1, 2), guidance=1.0)],
    [t2i([ref("grain", 0.5), ref("ink", -1.0)], seeds=(7,)), t2i(seeds=(8,))],
    [t2i([ref("pastel")])],
]


def close(a, b):
    return np.abs(a.astype(int) - b.astype(int)).max() <= 2


@pytest.fixture(scope="module")
def eager():
    dep = StableDiffusionDeployment(spec())
    return dep, [run_batch(dep, jobs) for jobs in WARM_UP + SWITCHES]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_compiled_unet_switches_adapters_and_weights_without_recompiling(backend, eager, monkeypatch):
    eager_dep, expected = eager
    if backend == "inductor":
        import torch._inductor.config as inductor_config

        monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", False)
    torch._dynamo.reset()
    before = graphs()  # Dynamo's counters outlive reset(): count from here
    dep = compiled_replica(backend)
    unet = dep.pipe.unet
    assert unet._compiled_call_impl is not None  # compiled in place: diffusers' calls reach its layers
    assert dep.loras.slots is not None and dep.loras.slots.compiled
    figures = FIGURES.setdefault(backend, {})

    images = []
    for index, jobs in enumerate(WARM_UP):
        started = time.perf_counter()
        images.append(run_batch(dep, jobs))
        figures[f"warm_up_{index}_s"] = round(time.perf_counter() - started, 1)
    warm_graphs = graphs()
    figures["graphs"] = warm_graphs - before
    assert warm_graphs - before <= 3  # slots on, slots off (and at most a one-row specialisation)
    swaps = dep.loras.slots.swaps

    timings = []
    with torch.compiler.set_stance("fail_on_recompile"):
        for jobs in SWITCHES:
            started = time.perf_counter()
            images.append(run_batch(dep, jobs))
            timings.append(time.perf_counter() - started)
    figures["recompiles"] = graphs() - warm_graphs
    figures["compiled_call_s"] = round(float(np.median(timings)), 3)
    started = time.perf_counter()
    for jobs in SWITCHES:
        run_batch(eager_dep, jobs)
    figures["eager_call_s"] = round((time.perf_counter() - started) / len(SWITCHES), 3)
    print(f"\n{backend}: {figures}")

    assert graphs() == warm_graphs, f"{graphs() - warm_graphs} recompiles across the switches"
    # The switches copied adapters into slots and evicted: in place, the same modules.
    assert dep.loras.slots.swaps > swaps and dep.loras.evictions
    names = {name for name, _ in unet.named_modules() if SLOT_PREFIX in name}
    assert len({name.rsplit(".", 1)[-1] for name in names}) == 2
    # Mixed batches ran as one call each.
    assert max(dep.batcher.stats.batch_sizes) >= 3
    for index, (got, want) in enumerate(zip(images, expected)):
        for job, (a, b) in enumerate(zip(got, want)):
            assert a.shape == b.shape and close(a, b), (index, job, np.abs(a.astype(int) - b).max())
    # The adapters reached the UNet's slots: their pictures are not the plain model's (one
    # step at 64x64 moves a tiny adapter's picture a few levels only: the largest change
    # counts; the eager replica's pixels, equal to these, are checked against each adapter
    # alone in test_lora_batches.py).
    first = [batch[0] for batch in images[len(WARM_UP):]]
    plain = images[0][0]
    assert max(np.abs(first[i].astype(int) - plain.astype(int)).max() for i in (0, 1, 3, 4, 11)) > 2
    # No adapter, and an adapter at weight 0, are the plain model's pixels.
    assert close(first[5], plain) and close(first[2], plain)
