"""Jobs of different LoRA adapters and weights in one UNet call (deployments/runtime/lora_slots.py):
on the tiny SD 2.1 and SDXL replicas, called directly (no Ray), in request mode and in step
mode, every job's image equals the one it gets alone; and the slots' rules (rank, layers,
more adapters than slots, one bad adapter among good ones, the least recently used slot)."""

import asyncio

import numpy as np
import pytest
import torch

from deployments.contract import LoraRef, PipelineSpec, TextToImageJob
from deployments.errors import InvalidJobError, ServerFaultError
from deployments.pipelines.sdxl import SDXLBaseDeployment
from deployments.pipelines.stable_diffusion import StableDiffusionDeployment

SIZE = 64
CLASSES = {"sd21": StableDiffusionDeployment, "sdxl": SDXLBaseDeployment}


def ref(name, family="sd21", weight=1.0, source=None):
    return LoraRef(name, source or f"tiny:lora/{family}/{name}", None, weight)


def t2i(loras=(), seeds=(1,), guidance=7.5):
    return TextToImageJob(prompt="a red fox", negative_prompt=None, width=SIZE, height=SIZE,
                          num_inference_steps=2, guidance_scale=guidance, seeds=tuple(seeds),
                          loras=tuple(loras))


def run(coro):
    return asyncio.run(coro).output


def together(*coros):
    """Results of ``coros`` run concurrently: outputs, or the exception a job raised."""
    async def main():
        return await asyncio.gather(*coros, return_exceptions=True)

    return [r if isinstance(r, BaseException) else r.output for r in asyncio.run(main())]


def max_diff(a, b):
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def differ(a, b):
    """Clearly different images: an adapter changed the picture, not a rounding."""
    return np.abs(a.astype(int) - b.astype(int)).mean() > 1.0


def replica(family="sd21", mode="request", **kw):
    return CLASSES[family](PipelineSpec(name=f"{family}-{mode}", family=family, source=f"tiny:{family}",
                                        batching_mode=mode, max_batch_images=8,
                                        batch_wait_timeout_s=0.2, **kw))


def jobs(family, guidance):
    """Six jobs of five adapter sets, seven images: no adapter, ink at 1 (two images),
    pastel at 0.5, ink at 1 with pastel at 0.5, grain at 1, ink at 0."""
    sets = {
        "none": (),
        "ink": (ref("ink", family),),
        "pastel@0.5": (ref("pastel", family, weight=0.5),),
        "ink+pastel@0.5": (ref("ink", family), ref("pastel", family, weight=0.5)),
        "grain": (ref("grain", family),),
        "ink@0": (ref("ink", family, weight=0.0),),
    }
    # One seed for all (so that the adapters alone make the images differ), two for ink.
    return {key: t2i(loras, (1, 2) if key == "ink" else (1,), guidance) for key, loras in sets.items()}


# -- the judged criterion: mixed batches equal each job alone ------------------------------

@pytest.fixture(scope="module", params=[(f, m) for f in ("sd21", "sdxl") for m in ("request", "step")],
                ids="-".join)
def mixed(request):
    """A replica of each family and batching mode, the configured adapters ink and pastel
    (SD 2.1: slots on their layers at their rank) or only Hub LoRAs allowed (SDXL: slots on
    the attention projections at the default rank); and what each job gives alone on it."""
    family, mode = request.param
    configured = {"loras": (ref("ink", family), ref("pastel", family))} if family == "sd21" else {"hub_loras": True}
    dep = replica(family, mode, **configured)
    alone = {guidance: {key: run(dep.text_to_image(job)) for key, job in jobs(family, guidance).items()}
             for guidance in (7.5, 1.0)}
    return family, mode, dep, alone


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_jobs_of_different_adapters_and_weights_share_one_unet_call_and_get_their_image_alone(mixed, guidance):
    family, mode, dep, alone = mixed
    expected = alone[guidance]
    # The adapters matter (a wrong row's adapters would show), and weight 0 is the plain model.
    for key in ("ink", "pastel@0.5", "ink+pastel@0.5", "grain"):
        assert differ(expected[key][:1], expected["none"]), key
    assert differ(expected["ink+pastel@0.5"], expected["ink"][:1])
    assert max_diff(expected["ink@0"], expected["none"]) <= 2
    batches, calls = len(dep.batcher.stats.batch_sizes), getattr(dep.steps, "stats", None)
    calls_before = calls.unet_calls if calls else 0
    got = dict(zip(expected, together(*(dep.text_to_image(job) for job in jobs(family, guidance).values()))))
    for key, image in got.items():
        assert max_diff(image, expected[key]) <= 2, (key, max_diff(image, expected[key]))
    if mode == "request":
        assert dep.batcher.stats.batch_sizes[batches:] == [7]  # one pipeline call of every job
    else:
        per_call = calls.jobs[calls_before - calls.unet_calls:]
        assert max(per_call) == 6, per_call  # every job in one UNet call


def test_guided_and_unguided_jobs_of_different_adapters_share_calls_in_step_mode(mixed):
    # Request mode batches one guidance scale to a call (it is in the batch key); step mode
    # runs guided jobs' two rows an image beside unguided jobs' one.
    family, mode, dep, alone = mixed
    picked = [("none", 7.5), ("ink", 1.0), ("ink+pastel@0.5", 7.5), ("pastel@0.5", 1.0), ("ink@0", 1.0)]
    batches, stats = len(dep.batcher.stats.batch_sizes), getattr(dep.steps, "stats", None)
    before = stats.unet_calls if stats else 0
    got = together(*(dep.text_to_image(jobs(family, guidance)[key]) for key, guidance in picked))
    for (key, guidance), image in zip(picked, got):
        assert max_diff(image, alone[guidance][key]) <= 2, (key, guidance)
    if mode == "request":
        assert sorted(dep.batcher.stats.batch_sizes[batches:]) == [2, 4]  # a call per guidance
    else:
        assert max(stats.jobs[before - stats.unet_calls:]) == len(picked)
        rows = sum(len(jobs(family, g)[key].seeds) * (2 if g > 1 else 1) for key, g in picked)
        assert rows in stats.rows[before - stats.unet_calls:]  # all of them in one call


# -- the slots' rules ----------------------------------------------------------------------

def _wide_lora(folder, rank=2):
    """A LoRA on a feed-forward layer of the tiny SD 2.1 UNet (not an attention projection):
    rank ``rank``, peft's key format."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(7)
    layer = "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2"
    folder.mkdir(parents=True)
    save_file({f"{layer}.lora_A.weight": torch.randn(rank, 128, generator=gen),
               f"{layer}.lora_B.weight": torch.randn(32, rank, generator=gen)},
              folder / "pytorch_lora_weights.safetensors")
    return str(folder)


def test_an_adapter_the_slots_cannot_take_is_the_clients_fault_when_a_request_names_it(tmp_path):
    dep = replica(hub_loras=True, lora_rank=2)  # the tiny LoRAs are of rank 4
    assert dep.loras.slots.rank == 2
    wide = LoraRef("wide", _wide_lora(tmp_path / "wide"), None, 1.0)
    for bad, why in ((ref("ink"), "its rank 4 is above this server's LoRA rank 2"),
                     (wide, "UNet layers outside this server's LoRA slots")):
        with pytest.raises(InvalidJobError) as info:
            run(dep.text_to_image(t2i([bad])))
        assert info.value.param == "loras" and repr(bad.name) in info.value.message
        assert why in info.value.message, info.value.message
        assert bad.name not in dep.loras.loaded
    assert dep.loras.slots.content == [None] * 3 and dep.loras.slots.swaps == 0
    assert dep.pipe.get_list_adapters() == {"unet": [f"serve_app_slot_{i}" for i in range(3)]}
    run(dep.text_to_image(t2i()))  # the replica goes on


def test_a_configured_adapter_the_slots_cannot_take_is_the_servers_fault(tmp_path):
    # ink is above the configured rank; late's folder appears after the start (its layers
    # were not read into the slots) with a layer outside them.
    late = LoraRef("late", str(tmp_path / "late"), None, 1.0)
    dep = replica(loras=(ref("ink"), late), lora_rank=2)
    _wide_lora(tmp_path / "late")
    for bad, why in ((ref("ink"), "its rank 4 is above"), (late, "outside this server's LoRA slots")):
        with pytest.raises(ServerFaultError) as info:
            run(dep.text_to_image(t2i([bad])))
        assert info.value.code == "lora_unavailable" and "fault of the server" in info.value.message
        assert repr(bad.name) in info.value.message and why in info.value.message
    run(dep.text_to_image(t2i()))


def _slots_used(dep):
    """Record, for each UNet weighing, the slots its rows use."""
    seen, real = [], dep.loras.weigh_unet

    def weigh(groups):
        seen.append({slot for weights, _ in groups for slot, weight in weights.items()})
        return real(groups)

    dep.loras.weigh_unet = weigh
    return seen


@pytest.mark.parametrize("mode", ["request", "step"])
def test_more_adapters_than_slots_run_in_several_calls_and_never_fail(mode):
    dep = replica(mode=mode, lora_slots=2)
    picked = {"ink": t2i([ref("ink")], (1,)), "pastel": t2i([ref("pastel")], (2,)),
              "grain": t2i([ref("grain")], (3,)), "none": t2i((), (4,))}
    alone = {key: run(dep.text_to_image(job)) for key, job in picked.items()}
    used = _slots_used(dep)
    batches = len(dep.batcher.stats.batch_sizes)
    got = dict(zip(picked, together(*(dep.text_to_image(job) for job in picked.values()))))
    for key, image in got.items():
        assert not isinstance(image, BaseException), (key, image)
        assert max_diff(image, alone[key]) <= 2, key
    assert used and all(len(slots) <= 2 for slots in used)
    if mode == "request":
        # grain waits (two slots held), the job without adapters joins: two calls.
        assert dep.batcher.stats.batch_sizes[batches:] == [3, 1]
    else:
        assert max(dep.steps.stats.jobs[-len(used):]) >= 2


@pytest.mark.parametrize("mode", ["request", "step"])
def test_a_bad_adapter_in_a_mixed_batch_fails_its_own_job_alone(mode):
    dep = replica(mode=mode)
    bad = ref("bad", source="tiny:lora/sdxl/ink")  # another model's LoRA, named by a request
    good = [t2i([ref("ink")], (1,)), t2i((), (2,)), t2i([ref("pastel", weight=0.5)], (3,))]
    alone = [run(dep.text_to_image(job)) for job in good]
    batches = len(dep.batcher.stats.batch_sizes)
    got = together(dep.text_to_image(good[0]), dep.text_to_image(t2i([bad], (4,))),
                   dep.text_to_image(good[1]), dep.text_to_image(good[2]))
    failed = got.pop(1)
    assert isinstance(failed, InvalidJobError) and failed.param == "loras" and "'bad'" in failed.message
    assert all(max_diff(image, want) <= 2 for image, want in zip(got, alone))
    if mode == "request":
        assert dep.batcher.stats.batch_sizes[batches:] == [4]  # it was in the call, and left out
    assert "bad" not in dep.loras.loaded


def test_a_third_adapter_on_two_slots_takes_the_least_recently_used_one():
    dep = replica(lora_slots=2)
    key = lambda name: dep.loras.loaded[name].key  # noqa: E731
    first = {name: run(dep.text_to_image(t2i([ref(name)]))) for name in ("ink", "pastel")}
    run(dep.text_to_image(t2i([ref("ink")], (5,))))  # ink served last: pastel's slot is the older
    assert dep.loras.slots.swaps == 2
    run(dep.text_to_image(t2i([ref("grain")])))
    assert dep.loras.slots.content == [key("ink"), key("grain")] and dep.loras.slots.swaps == 3
    again = run(dep.text_to_image(t2i([ref("ink")])))  # still in its slot: no copy
    assert dep.loras.slots.swaps == 3 and max_diff(again, first["ink"]) <= 2
    back = run(dep.text_to_image(t2i([ref("pastel")])))  # copied in again, over grain
    assert dep.loras.slots.content == [key("ink"), key("pastel")] and dep.loras.slots.swaps == 4
    assert max_diff(back, first["pastel"]) <= 2
    assert dep.loras.loads == ["ink", "pastel", "grain"]  # all still loaded: only slots swap
