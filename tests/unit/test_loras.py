"""LoRA adapters per request on the tiny SD 2.1 and SDXL replicas, called directly (no Ray),
with the seeded tiny LoRAs (``tiny:lora/<family>/<name>``)."""

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from deployments.contract import ImageToImageJob, LoraRef, PipelineSpec, TextToImageJob
from deployments.errors import InvalidJobError, ServerFaultError
from deployments.sources import Source, local_path
from deployments.runtime.loras import LoraCache, LoraStackError, adapter_name, lora_identity
from deployments.pipelines.sdxl import SDXLBaseDeployment
from deployments.pipelines.stable_diffusion import StableDiffusionDeployment
from deployments.standins.tiny import materialize_tiny, materialize_tiny_lora, resolve_tiny_lora

LORA_FILE = "pytorch_lora_weights.safetensors"
SIZE = 64


def run(coro):
    return asyncio.run(coro).output


def gather(*coros):
    async def together():
        return await asyncio.gather(*coros)

    return [result.output for result in asyncio.run(together())]


def ref(name, family="sd21", weight=1.0, source=None):
    return LoraRef(name, source or f"tiny:lora/{family}/{name}", None, weight)


def t2i(loras=(), seeds=(1,), **kw):
    fields = dict(prompt="a red fox", negative_prompt=None, width=SIZE, height=SIZE,
                  num_inference_steps=2, guidance_scale=7.5, seeds=tuple(seeds), loras=tuple(loras))
    fields.update(kw)
    return TextToImageJob(**fields)


def i2i(loras=(), seeds=(3,)):
    return ImageToImageJob(prompt="a fox in snow", negative_prompt=None, width=SIZE, height=SIZE,
                           num_inference_steps=2, guidance_scale=7.5, strength=0.9,
                           seeds=tuple(seeds), loras=tuple(loras))


def differ(a, b):
    """Clearly different images: an adapter changes the picture, not a rounding."""
    return np.abs(a.astype(int) - b.astype(int)).mean() > 1.0


def close(a, b):
    """The same image up to batching (test_deployments: batch-size-dependent kernels), and up
    to LoRA layers in place: with the lock's diffusers 0.42.1, peft 0.21.2 and transformers
    5.23.0, a tiny replica that has loaded an adapter gives 1/255 off a never-loaded one's
    pixels in a few places with the adapter off or at weight 0 (seen in CI on this lock)."""
    return np.abs(a.astype(int) - b.astype(int)).max() <= 2


def sd_spec(**kw):
    return PipelineSpec(name="sd", family="sd21", source="tiny:sd21", **kw)


@pytest.fixture(scope="module")
def sd():
    return StableDiffusionDeployment(sd_spec())


@pytest.fixture(scope="module")
def sdxl():
    return SDXLBaseDeployment(PipelineSpec(name="xl", family="sdxl", source="tiny:sdxl"))


@pytest.fixture(scope="module")
def fresh():
    """Pixels of replicas that never load an adapter."""
    sd = StableDiffusionDeployment(sd_spec())
    xl = SDXLBaseDeployment(PipelineSpec(name="xl", family="sdxl", source="tiny:sdxl"))
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return {
        "sd21": run(sd.text_to_image(t2i())),
        "sdxl": run(xl.text_to_image(t2i())),
        "sd21-i2i": run(sd.image_to_image(i2i(), image)),
        "image": image,
    }


@pytest.fixture(scope="module")
def alone(sd):
    """What each adapter set gives on its own (one job, one pipeline call)."""
    sets = {"none": (), "ink": (ref("ink"),), "pastel": (ref("pastel"),),
            "both": (ref("ink", weight=0.7), ref("pastel", weight=-0.5))}
    return {key: run(sd.text_to_image(t2i(loras))) for key, loras in sets.items()}


# -- the tiny LoRAs ----------------------------------------------------------------------

def test_tiny_lora_is_a_seeded_diffusers_lora_file(tmp_path):
    from safetensors import safe_open

    first = materialize_tiny_lora("sd21", "ink", root=tmp_path / "a")
    again = materialize_tiny_lora("sd21", "ink", root=tmp_path / "b")
    other = materialize_tiny_lora("sd21", "pastel", root=tmp_path / "a")
    assert first.name.startswith("lora-sd21-ink-v") and (first / "tiny.json").is_file()
    assert (first / LORA_FILE).read_bytes() == (again / LORA_FILE).read_bytes()
    assert materialize_tiny_lora("sd21", "ink", root=tmp_path / "a") == first  # cached
    with safe_open(first / LORA_FILE, "pt") as a, safe_open(other / LORA_FILE, "pt") as b:
        keys = list(a.keys())
        assert keys == list(b.keys())
        assert all("lora" in key for key in keys)
        assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder"}
        for module in ("to_q", "to_k", "to_v", "to_out", "q_proj", "k_proj", "v_proj", "out_proj"):
            assert any(f".{module}." in key for key in keys), module
        # Rank 4, both factors random (not peft's zero-initialised B).
        downs = [key for key in keys if key.endswith("down.weight")]
        assert {a.get_tensor(key).shape[0] for key in downs} == {4}
        ups = [key for key in keys if key.endswith("up.weight")]
        assert all(a.get_tensor(key).abs().sum() > 0 for key in ups)
        assert not all(torch.equal(a.get_tensor(key), b.get_tensor(key)) for key in keys)
    xl = materialize_tiny_lora("sdxl", "ink", root=tmp_path / "a")
    with safe_open(xl / LORA_FILE, "pt") as c:
        assert {key.split(".")[0] for key in c.keys()} == {"unet", "text_encoder", "text_encoder_2"}
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]


def test_tiny_lora_bytes_are_the_same_in_another_process(tmp_path):
    code = ("import sys; from deployments.standins.tiny import materialize_tiny_lora as m; "
            "print(m('sd21', 'ink', root=sys.argv[1]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    theirs = (tmp_path / os.path.basename(out) / LORA_FILE).read_bytes()
    ours = (resolve_tiny_lora("tiny:lora/sd21/ink") / LORA_FILE).read_bytes()
    assert hashlib.sha256(theirs).digest() == hashlib.sha256(ours).digest()


def test_tiny_lora_sources_resolve_to_their_folder():
    folder = resolve_tiny_lora("tiny:lora/sdxl/ink")
    assert local_path(Source.parse("tiny:lora/sdxl/ink")) == str(folder)
    assert (folder / LORA_FILE).is_file()
    for bad in ("tiny:lora/sd21", "tiny:lora/esrgan/ink", "tiny:lora/sd21/../x", "tiny:lora/sd21/a/b"):
        with pytest.raises(ValueError):
            local_path(Source.parse(bad))


def test_tiny_lora_loads_through_load_lora_weights():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(materialize_tiny("sd21"), local_files_only=True)
    pipe.load_lora_weights(resolve_tiny_lora("tiny:lora/sd21/ink"), adapter_name="ink")
    assert pipe.get_list_adapters() == {"unet": ["ink"], "text_encoder": ["ink"]}


def test_adapter_names_peft_cannot_take_are_mapped():
    assert adapter_name("ink") == "ink" and adapter_name("org/some-lora") == "org/some-lora"
    for name in ("org/lora-v1.5", "half", "to", "training"):
        mapped = adapter_name(name)
        assert mapped != name and "." not in mapped and mapped == adapter_name(name)
    assert adapter_name("org/a.b") != adapter_name("org/a_b")


def test_the_adapters_a_job_counts_against_the_slots_are_its_set_in_any_order_without_weights():
    # What the batchers count against a replica's LoRA slots: weights are per row, so the
    # same adapter at another weight takes no other slot; another file of a name does.
    a, b = ref("ink", weight=0.5), ref("pastel")
    assert lora_identity([a, b]) == lora_identity([b, a])
    assert lora_identity([a]) == lora_identity([ref("ink", weight=0.6)])
    assert lora_identity([a]) != lora_identity([ref("ink", source="tiny:lora/sd21/other")])
    assert len(lora_identity([a, b])) == 2 and lora_identity([]) == frozenset()


# -- replicas ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd21", "sdxl"])
def test_adapter_changes_pixels_and_no_adapter_is_the_plain_model(family, sd, sdxl, fresh):
    dep = {"sd21": sd, "sdxl": sdxl}[family]
    with_ink = run(dep.text_to_image(t2i([ref("ink", family)])))
    assert differ(with_ink, fresh[family])
    # Weight 0 and no adapter at all: the pixels of a replica that never loaded one.
    assert close(run(dep.text_to_image(t2i([ref("ink", family, weight=0.0)]))), fresh[family])
    assert close(run(dep.text_to_image(t2i())), fresh[family])
    assert np.array_equal(run(dep.text_to_image(t2i([ref("ink", family)]))), with_ink)
    assert dep.loras.loads.count("ink") == 1  # loaded once, not per request


def test_same_adapter_set_batches_and_keeps_each_jobs_pixels(sd, alone):
    before = len(sd.batcher.stats.batch_sizes)
    first, second = gather(sd.text_to_image(t2i([ref("ink")], seeds=(1,))),
                           sd.text_to_image(t2i([ref("ink")], seeds=(2,))))
    assert sd.batcher.stats.batch_sizes[before:] == [2]
    assert close(first, alone["ink"])
    assert not close(second, alone["ink"])


def test_concurrent_jobs_with_other_adapter_sets_get_what_they_get_alone(sd, alone, fresh):
    assert close(alone["none"], fresh["sd21"])
    keys = ["none", "ink", "pastel", "both", "ink"]
    sets = {"none": (), "ink": (ref("ink"),), "pastel": (ref("pastel"),),
            # listed in the other order: the same set
            "both": (ref("pastel", weight=-0.5), ref("ink", weight=0.7))}
    before = len(sd.batcher.stats.batch_sizes)
    outputs = gather(*(sd.text_to_image(t2i(sets[key])) for key in keys))
    # Adapters do not split batches: one pipeline call, each row with its job's adapters.
    assert sd.batcher.stats.batch_sizes[before:] == [5]
    for key, output in zip(keys, outputs):
        assert close(output, alone[key]), key


def test_two_adapters_at_once_with_weights(sd, alone):
    both = alone["both"]
    for other in ("none", "ink", "pastel"):
        assert differ(both, alone[other]), other
    # The UNet holds its slots alone (the adapters' UNet parts are copied into them); the
    # text encoder holds the adapters under their own names.
    adapters = sd.pipe.get_list_adapters()
    assert adapters["unet"] == [f"serve_app_slot_{i}" for i in range(sd.loras.slot_count)]
    assert sorted(adapters["text_encoder"]) == ["ink", "pastel"]
    keys = {sd.loras.loaded[name].key for name in ("ink", "pastel")}
    assert keys <= set(sd.loras.slots.content)
    assert differ(run(sd.text_to_image(t2i([ref("ink", weight=0.7), ref("pastel", weight=0.5)]))), both)


def test_image_to_image_and_inpainting_run_the_adapter(sd, fresh):
    image = fresh["image"]
    with_ink = run(sd.image_to_image(i2i([ref("ink")]), image))
    assert differ(with_ink, fresh["sd21-i2i"])
    together = gather(sd.image_to_image(i2i([ref("ink")]), image), sd.image_to_image(i2i(), image))
    assert close(together[0], with_ink)
    assert close(together[1], fresh["sd21-i2i"])
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2:] = 255
    painted = [run(sd.image_to_image(i2i(loras), image, mask)) for loras in ((), (ref("ink"),))]
    assert differ(painted[0], painted[1])


def test_least_recently_used_adapter_is_evicted_and_reloaded(fresh):
    dep = StableDiffusionDeployment(sd_spec(max_loaded_loras=1, lora_slots=1))
    events = []

    class Recorder:
        def on_lora_load(self, adapter):
            events.append(("load", adapter))

        def on_lora_eviction(self, adapter):
            events.append(("evict", adapter))

    dep.loras.metrics = Recorder()
    first = run(dep.text_to_image(t2i([ref("ink")])))
    run(dep.text_to_image(t2i([ref("pastel")])))
    # ink is unloaded: gone from the text encoder and from the cache; its slot took pastel.
    assert list(dep.loras.loaded) == ["pastel"]
    assert dep.pipe.get_list_adapters()["text_encoder"] == ["pastel"]
    assert dep.loras.slots.content == [dep.loras.loaded["pastel"].key]
    again = run(dep.text_to_image(t2i([ref("ink")])))
    assert close(again, first)
    assert dep.loras.slots.swaps == 3
    assert dep.loras.loads == ["ink", "pastel", "ink"] and dep.loras.evictions == ["ink", "pastel"]
    assert events == [("load", "ink"), ("evict", "ink"), ("load", "pastel"), ("evict", "pastel"),
                      ("load", "ink")]
    assert close(run(dep.text_to_image(t2i())), fresh["sd21"])
    with pytest.raises(InvalidJobError) as info:  # two adapters never fit one slot
        run(dep.text_to_image(t2i([ref("ink"), ref("pastel")])))
    assert info.value.param == "loras"


def test_replica_metrics_count_loads_and_evictions_per_adapter(monkeypatch):
    from deployments.runtime.metrics import ReplicaMetrics

    metrics, seen = ReplicaMetrics("sd"), []
    monkeypatch.setattr(metrics.lora_loads, "inc", lambda value, tags: seen.append(("load", value, tags)))
    monkeypatch.setattr(metrics.lora_evictions, "inc", lambda value, tags: seen.append(("evict", value, tags)))
    metrics.on_lora_load("ink")
    metrics.on_lora_eviction("ink")
    assert seen == [("load", 1, {"model": "sd", "adapter": "ink"}),
                    ("evict", 1, {"model": "sd", "adapter": "ink"})]


def _torn_lora(folder):
    """The SD 2.1 ink LoRA with text-encoder factors of the wrong width: its UNet part loads,
    its text encoder part fails."""
    from safetensors.torch import load_file, save_file

    state = load_file(resolve_tiny_lora("tiny:lora/sd21/ink") / LORA_FILE)
    for key in state:
        if key.startswith("text_encoder.") and key.endswith("down.weight"):
            state[key] = torch.zeros(state[key].shape[0], 5)
    folder.mkdir()
    save_file(state, folder / LORA_FILE)
    return folder


def _saved(folder, state):
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(state, folder / LORA_FILE)
    return folder


@pytest.mark.parametrize("case", ["sdxl-lora", "torn", "not-a-lora", "no-layer-fits"])
def test_a_requested_adapter_that_is_not_this_models_is_a_bad_job_and_the_replica_goes_on(
        case, sd, alone, fresh, tmp_path):
    # A Hub LoRA a request names (not in the config): its own faults are the client's (400).
    source = {
        "sdxl-lora": lambda: "tiny:lora/sdxl/ink",  # another model's shapes
        "torn": lambda: str(_torn_lora(tmp_path / "torn")),
        "not-a-lora": lambda: str(_saved(tmp_path / "plain", {"unet.conv_in.weight": torch.zeros(2, 2)})),
        # A LoRA of a transformer model: diffusers finds no UNet or text encoder key, warns
        # and loads nothing.
        "no-layer-fits": lambda: str(_saved(tmp_path / "dit", {
            "transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
            "transformer.blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)})),
    }[case]()
    bad = LoraRef(f"bad-{case}", source, None, 1.0)
    with pytest.raises(InvalidJobError) as info:
        run(sd.text_to_image(t2i([bad])))
    assert info.value.param == "loras" and f"bad-{case}" in info.value.message
    assert all(bad.name not in names for names in sd.pipe.get_list_adapters().values())
    assert bad.name not in sd.loras.loaded
    assert close(run(sd.text_to_image(t2i())), fresh["sd21"])
    assert close(run(sd.text_to_image(t2i([ref("ink")]))), alone["ink"])


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    """A replica whose config names ink (loads) and ghost (its folder is not on the server)."""
    ghost = LoraRef("ghost", str(tmp_path_factory.mktemp("loras") / "ghost"), None, 1.0)
    return StableDiffusionDeployment(sd_spec(loras=(ref("ink"), ghost))), ghost


def test_the_start_probe_loads_the_first_configured_adapter_and_leaves_the_model_as_loaded(
        configured, fresh):
    dep, _ = configured  # its start loaded ink and removed it again (before any job)
    # What stays is the UNet's empty slots, made at start (requests may name adapters), on
    # the configured adapters' layers at their rank; the probe's adapter is gone everywhere.
    assert dep.pipe.get_list_adapters() == {"unet": [f"serve_app_slot_{i}" for i in range(3)]}
    assert not any("lora" in name for name, _ in dep.pipe.text_encoder.named_modules())
    assert dep.loras.slots.content == [None] * 3 and dep.loras.slots.rank == 4
    assert all(".to_" in layer for layer in dep.loras.slots.layers)
    assert dep.loras.loaded == {} and dep.loras.loads == []
    assert close(run(dep.text_to_image(t2i())), fresh["sd21"])


def test_a_configured_adapter_that_does_not_load_is_the_servers_fault(configured, alone, fresh):
    dep, ghost = configured
    with pytest.raises(ServerFaultError) as info:
        run(dep.text_to_image(t2i([ghost])))
    assert info.value.code == "lora_unavailable"
    assert "'ghost'" in info.value.message and "no such file or folder" in info.value.message
    assert "fault of the server" in info.value.message
    assert close(run(dep.text_to_image(t2i())), fresh["sd21"])
    assert close(run(dep.text_to_image(t2i([ref("ink")]))), alone["ink"])


@pytest.mark.parametrize("family", ["sd21", "sdxl"])
def test_with_hub_loras_only_the_start_probe_is_a_zero_lora_of_every_loadable_module(family, fresh, monkeypatch):
    from deployments.runtime.loras import probe_state_dict

    cls = StableDiffusionDeployment if family == "sd21" else SDXLBaseDeployment
    loaded = []
    real = cls.pipeline_cls.load_lora_weights
    monkeypatch.setattr(cls.pipeline_cls, "load_lora_weights",
                        lambda pipe, source, **kw: (loaded.append(source), real(pipe, source, **kw))[1])
    dep = cls(PipelineSpec(name=family, family=family, source=f"tiny:{family}", hub_loras=True))
    (state,) = loaded
    modules = {key.split(".")[0] for key in state}
    assert modules == ({"unet", "text_encoder"} if family == "sd21" else {"unet", "text_encoder", "text_encoder_2"})
    assert all(not value.any() for key, value in state.items() if "lora_B" in key)
    plain = cls.pipeline_cls.from_pretrained(materialize_tiny(family), local_files_only=True)
    assert state.keys() == probe_state_dict(plain).keys()
    # The probe is gone; the UNet keeps its empty slots on the attention projections at the
    # default rank (no adapter is configured to take them from).
    from deployments.runtime.lora_slots import DEFAULT_SLOT_RANK

    assert dep.pipe.get_list_adapters() == {"unet": [f"serve_app_slot_{i}" for i in range(3)]}
    assert dep.loras.slots.rank == DEFAULT_SLOT_RANK
    assert close(run(dep.text_to_image(t2i())), fresh[family])


def test_a_broken_lora_stack_stops_the_replica_from_starting(monkeypatch, tmp_path):
    # The clash of transformers >= 5.24 with peft 0.21 (transformers' own check, made to
    # fail here by raising its minimum): the replica does not start, and says why.
    import transformers.integrations.peft as transformers_peft

    monkeypatch.setenv("SERVE_APP_TINY_CACHE", str(tmp_path))  # the tiny LoRA is built at start
    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", "99.0")
    logged = []
    monkeypatch.setattr("deployments.runtime.loras.logger.error", lambda message, *args: logged.append(message % args))
    with pytest.raises(LoraStackError) as info:
        StableDiffusionDeployment(sd_spec(loras=(ref("ink"),)))
    message = str(info.value)
    assert "adapter 'ink' cannot be loaded at start" in message
    assert "The version of PEFT you are using is not compatible" in message
    assert "transformers " in message and "peft " in message and "constraints.txt" in message
    assert logged == [message]  # the replica's log says it too, as Serve reports it


# -- Hub LoRAs a request names: checked, fetched off the pipeline thread, loaded from the cache -

class FakeHub:
    """The Hub, faked where loras.py reaches it (``HfApi().repo_info`` and ``hf_hub_download``):
    ``repos`` maps a repo id to its files (a local file to serve, or a size in bytes for a file
    that must never be downloaded). It records the metadata calls and the downloads (with the
    thread each ran on); a download waits for ``gate`` when one is set."""

    SHA = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, monkeypatch, cache, repos):
        self.cache, self.repos = cache, repos
        self.infos, self.downloads = [], []
        self.gate = None
        monkeypatch.setattr("deployments.runtime.loras.HfApi", lambda: self)
        monkeypatch.setattr("deployments.runtime.loras.hf_hub_download", self.download)

    def repo_info(self, repo_id, *, revision=None, repo_type=None, files_metadata=False):
        from types import SimpleNamespace

        from huggingface_hub.hf_api import RepoSibling

        assert files_metadata  # the sizes are asked for
        self.infos.append(repo_id)
        if repo_id not in self.repos:
            _not_on_the_hub(repo_id)
        siblings = [RepoSibling(rfilename=name, size=f if isinstance(f, int) else os.path.getsize(f))
                    for name, f in self.repos[repo_id].items()]
        return SimpleNamespace(sha=self.SHA, siblings=siblings)

    def download(self, repo_id, filename, *, revision=None, repo_type=None):
        self.downloads.append((repo_id, filename, revision, threading.current_thread().name))
        if self.gate is not None:
            assert self.gate.wait(60)
        target = self.cache / repo_id / (revision or "main") / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.repos[repo_id][filename], target)
        return str(target)


def _not_on_the_hub(repo_id):
    import httpx
    from huggingface_hub.errors import RepositoryNotFoundError

    url = f"https://huggingface.co/api/models/{repo_id}"
    raise RepositoryNotFoundError("404 Client Error: Repository Not Found",
                                  response=httpx.Response(404, request=httpx.Request("GET", url)))


INK_FILE = lambda: resolve_tiny_lora("tiny:lora/sd21/ink") / LORA_FILE  # noqa: E731


def hub(repo):
    """A Hub LoRA as a request names it (serve_app/service/planning.py: lora_refs)."""
    return LoraRef(repo, Source.hub(repo), None, 1.0)


def hub_replica(**kw):
    return StableDiffusionDeployment(sd_spec(hub_loras=True, **kw))


async def until(condition, timeout=30.0):
    """Wait on the event loop (so the replica's own tasks run) until ``condition()``."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def loads_seen(dep, monkeypatch):
    """Record (thread, source, weight_name) of each adapter file ``dep``'s pipeline reads
    (``lora_state_dict``: what a load reads before copying into slots and text encoders)."""
    seen, real = [], dep.pipe.lora_state_dict

    def load(source, **kw):
        seen.append((threading.current_thread().name, str(source), kw.get("weight_name")))
        return real(source, **kw)

    monkeypatch.setattr(dep.pipe, "lora_state_dict", load)
    return seen


def test_a_hub_lora_over_the_size_bound_is_a_bad_job_and_nothing_downloads(monkeypatch, tmp_path):
    dep = hub_replica(max_hub_lora_bytes=10**6)
    fake = FakeHub(monkeypatch, tmp_path, {"someone/huge": {LORA_FILE: 5 * 2**30}})
    with pytest.raises(InvalidJobError) as info:
        run(dep.text_to_image(t2i([hub("someone/huge")])))
    assert info.value.param == "loras"
    assert "'someone/huge'" in info.value.message
    assert f"its file {LORA_FILE} is 5,120 MiB" in info.value.message and "at most 1 MiB" in info.value.message
    assert fake.infos == ["someone/huge"] and fake.downloads == []
    assert dep.loras.loads == []


@pytest.mark.parametrize("files", [{"lora.bin": 1000}, {"README.md": 10, "optimizer.safetensors": 10}])
def test_a_hub_repo_without_a_safetensors_lora_file_is_a_bad_job(files, monkeypatch, tmp_path):
    dep = hub_replica()
    fake = FakeHub(monkeypatch, tmp_path, {"someone/pickled": files})
    with pytest.raises(InvalidJobError) as info:
        run(dep.text_to_image(t2i([hub("someone/pickled")])))
    assert info.value.param == "loras" and "no .safetensors LoRA file" in info.value.message
    assert fake.downloads == []


def test_a_hub_lora_downloads_off_the_pipeline_thread_while_other_batches_run(monkeypatch, tmp_path, alone):
    dep = hub_replica()
    fake = FakeHub(monkeypatch, tmp_path / "cache", {"someone/ink": {"README.md": INK_FILE(), LORA_FILE: INK_FILE()}})
    fake.gate = threading.Event()
    loads = loads_seen(dep, monkeypatch)

    async def scenario():
        with_lora = asyncio.ensure_future(dep.text_to_image(t2i([hub("someone/ink")])))
        await until(lambda: fake.downloads)  # the download has started, and waits on the gate
        plain = await asyncio.wait_for(dep.text_to_image(t2i()), 60)  # another batch runs meanwhile
        assert not with_lora.done()
        fake.gate.set()
        return (await with_lora).output, plain.output

    with_lora, plain = asyncio.run(scenario())
    ((repo, name, revision, download_thread),) = fake.downloads
    assert (repo, name, revision) == ("someone/ink", LORA_FILE, FakeHub.SHA)  # the commit checked
    assert download_thread.startswith("sd-lora-download")
    # The pipeline thread loaded the downloaded file, from the cache folder, not the Hub id.
    ((load_thread, source, weight_name),) = loads
    assert load_thread.startswith("sd-pipeline")
    assert (source, weight_name) == (str(tmp_path / "cache/someone/ink" / FakeHub.SHA), LORA_FILE)
    assert close(with_lora, alone["ink"]) and close(plain, alone["none"])
    # Fetched once: a later request asks the Hub nothing.
    run(dep.text_to_image(t2i([hub("someone/ink")], seeds=(2,))))
    assert fake.infos == ["someone/ink"] and len(fake.downloads) == 1


def test_requests_for_one_hub_lora_share_one_download_and_a_cancelled_one_stops_waiting(
        monkeypatch, tmp_path, alone):
    dep = hub_replica()
    fake = FakeHub(monkeypatch, tmp_path, {"someone/ink": {LORA_FILE: INK_FILE()}})
    fake.gate = threading.Event()
    key = ("someone/ink", None)

    async def scenario():
        jobs = [asyncio.ensure_future(dep.text_to_image(t2i([hub("someone/ink")]))) for _ in range(2)]
        await until(lambda: dep.loras._waiters.get(key) == 2)
        # A third caller gives up (its timeout): it stops waiting at once, the others do not.
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(dep.text_to_image(t2i([hub("someone/ink")])), 0.3)
        assert time.monotonic() - started < 5 and dep.loras._waiters[key] == 2
        fake.gate.set()
        return [(await job).output for job in jobs]

    outputs = asyncio.run(scenario())
    assert len(fake.infos) == 1 and len(fake.downloads) == 1
    assert all(close(output, alone["ink"]) for output in outputs)


def test_a_queued_hub_download_is_dropped_only_when_nobody_waits_for_it(monkeypatch, tmp_path):
    from deployments.runtime.loras import HUB_DOWNLOAD_WORKERS

    dep = hub_replica()
    repos = {f"someone/lora{i}": {LORA_FILE: INK_FILE()} for i in range(2 * HUB_DOWNLOAD_WORKERS)}
    repos.update({"someone/kept": {LORA_FILE: INK_FILE()}, "someone/dropped": {LORA_FILE: INK_FILE()}})
    fake = FakeHub(monkeypatch, tmp_path, repos)

    async def queued_behind_busy_threads(first, callers):
        """Fill the download threads, queue ``callers`` (repo, seconds it waits) behind them,
        then let the threads go; returns what the callers got."""
        fake.gate = threading.Event()
        done = len(fake.downloads)
        busy = [asyncio.ensure_future(dep.text_to_image(t2i([hub(f"someone/lora{i}")])))
                for i in range(first, first + HUB_DOWNLOAD_WORKERS)]
        await until(lambda: len(fake.downloads) == done + HUB_DOWNLOAD_WORKERS)
        waiting = [asyncio.ensure_future(asyncio.wait_for(dep.text_to_image(t2i([hub(repo)])), limit))
                   for repo, limit in callers]
        await asyncio.sleep(0.5)  # the short-lived callers give up, their downloads still queued
        fake.gate.set()
        await asyncio.gather(*busy)
        return await asyncio.gather(*waiting, return_exceptions=True)

    # One of two callers gives up: the other still gets the download it shares.
    gave_up, kept = asyncio.run(queued_behind_busy_threads(0, [("someone/kept", 0.2), ("someone/kept", 60)]))
    assert isinstance(gave_up, asyncio.TimeoutError) and kept.output is not None
    # The only caller gives up: its queued download is dropped before it reaches the Hub.
    (gave_up,) = asyncio.run(queued_behind_busy_threads(HUB_DOWNLOAD_WORKERS, [("someone/dropped", 0.2)]))
    assert isinstance(gave_up, asyncio.TimeoutError)
    assert [d[0] for d in fake.downloads].count("someone/kept") == 1
    assert "someone/dropped" not in fake.infos + [d[0] for d in fake.downloads]


def test_a_hub_lora_a_request_names_is_the_clients_fault_only_for_its_own_faults(monkeypatch, tmp_path):
    import httpx

    dep = hub_replica()
    FakeHub(monkeypatch, tmp_path, {})
    with pytest.raises(InvalidJobError) as info:  # not on the Hub
        run(dep.text_to_image(t2i([hub("someone/no-such-lora")])))
    assert info.value.param == "loras"

    class Unreachable:
        def repo_info(self, repo_id, **kw):
            raise httpx.ConnectError("[Errno 101] Network is unreachable")

    monkeypatch.setattr("deployments.runtime.loras.HfApi", Unreachable)
    with pytest.raises(ServerFaultError) as info:
        run(dep.text_to_image(t2i([hub("someone/no-such-lora")])))
    assert info.value.code == "lora_unavailable" and "fault of the server" in info.value.message
    monkeypatch.undo()
    # The real huggingface_hub with the Hub out of reach (HF_HUB_OFFLINE in tests): the server's.
    with pytest.raises(ServerFaultError) as info:
        run(dep.text_to_image(t2i([hub("someone/no-such-lora")])))
    assert info.value.code == "lora_unavailable" and "offline mode" in info.value.message


def test_a_hub_id_a_request_names_is_never_read_as_a_folder_of_the_server(monkeypatch, tmp_path):
    # A folder under the replica's working directory with the Hub id's name: diffusers'
    # load_lora_weights("someone/ink") would read it before asking the Hub.
    (tmp_path / "someone/ink").mkdir(parents=True)
    shutil.copy(INK_FILE(), tmp_path / "someone/ink" / LORA_FILE)
    monkeypatch.chdir(tmp_path)
    dep = hub_replica()
    loads = loads_seen(dep, monkeypatch)
    with pytest.raises(ServerFaultError):  # the Hub is out of reach (HF_HUB_OFFLINE)
        run(dep.text_to_image(t2i([hub("someone/ink")])))
    assert loads == [] and dep.loras.loads == []
    fake = FakeHub(monkeypatch, tmp_path / "cache", {})
    with pytest.raises(InvalidJobError):  # the Hub says there is no such repo
        run(dep.text_to_image(t2i([hub("someone/ink")])))
    assert fake.infos == ["someone/ink"] and loads == []


def test_an_adapter_the_config_names_on_the_hub_is_not_bounded_and_downloads_as_named(monkeypatch, tmp_path, alone):
    big = LoraRef("big", "someone/big", "big.safetensors", 1.0)
    fake = FakeHub(monkeypatch, tmp_path, {"someone/big": {"big.safetensors": INK_FILE()}})
    # The start probe loads it (through the same fetch), then a request's job.
    dep = StableDiffusionDeployment(sd_spec(loras=(big,), max_hub_lora_bytes=1))
    loads = loads_seen(dep, monkeypatch)
    at_start = len(fake.downloads)
    assert close(run(dep.text_to_image(t2i([big]))), alone["ink"])
    assert fake.infos == []  # named with its file: no listing, works offline from the cache
    # At start (the probe, the slots' layers and rank), each the named file; the file read
    # for the slots is the one the first request loads: it is not fetched again.
    assert {d[:2] for d in fake.downloads} == {("someone/big", "big.safetensors")}
    assert len(fake.downloads) == at_start
    assert not any(d[3].startswith("sd-pipeline") for d in fake.downloads)
    assert loads == [(loads[0][0], str(tmp_path / "someone/big/main"), "big.safetensors")]


@pytest.mark.parametrize("files", [
    ["pytorch_lora_weights.safetensors", "other.safetensors", "README.md"],
    ["my_style.safetensors", "README.md", "config.json"],
    ["optimizer.safetensors", "scheduler.safetensors", "style.safetensors"],
    ["README.md", "lora.bin"],
])
def test_the_hub_file_is_the_one_diffusers_would_choose(files, tmp_path):
    from diffusers.loaders.lora_base import _best_guess_weight_name

    from deployments.runtime.loras import best_guess_weight_name

    for name in files:
        (tmp_path / name).write_bytes(b"")
    assert best_guess_weight_name(files) == _best_guess_weight_name(str(tmp_path))


def test_the_config_bounds_hub_loras_at_1_gib_by_default(tiny_args):
    from serve_app.config import ConfigError, load_app_config

    assert load_app_config(tiny_args).model("stable-diffusion-2-1").pipeline_spec().max_hub_lora_bytes == 2**30
    model = dict(tiny_args["models"][0], allow_hub_loras=True, max_hub_lora_bytes=250 * 10**6)
    config = load_app_config(dict(tiny_args, models=[model] + tiny_args["models"][1:]))
    assert config.model("stable-diffusion-2-1").pipeline_spec().max_hub_lora_bytes == 250 * 10**6
    with pytest.raises(ConfigError, match="max_hub_lora_bytes"):
        bad = dict(tiny_args["models"][0], max_hub_lora_bytes=0)
        load_app_config(dict(tiny_args, models=[bad] + tiny_args["models"][1:]))


def test_a_replica_without_adapters_rejects_jobs_with_them():
    from deployments.runtime.replica import PipelineDeployment

    dep = PipelineDeployment.__new__(PipelineDeployment)
    dep.spec, dep.loras = sd_spec(), None
    with pytest.raises(InvalidJobError) as info:
        dep._check_loras(t2i([ref("ink")]))
    assert info.value.param == "loras"
    assert dep._check_loras(t2i()) == frozenset()


def test_a_fixed_adapter_set_fused_into_the_weights_runs_without_lora_layers(alone):
    fused = StableDiffusionDeployment(sd_spec(fused_loras=(ref("ink", weight=0.7), ref("pastel", weight=-0.5))))
    # No LoRA layers left: every step runs at the plain model's cost.
    assert not any("lora" in name for name, _ in fused.pipe.unet.named_modules())
    # The same pixels as the two adapters applied per request, up to float rounding of the merge.
    assert close(run(fused.text_to_image(t2i())), alone["both"])
    # Per-request adapters still load on top.
    assert differ(run(fused.text_to_image(t2i((ref("ink"),)))), alone["both"])


def test_the_config_fuses_adapters_and_requests_cannot_name_them(tiny_args):
    from serve_app.config import ConfigError, load_app_config

    model = dict(tiny_args["models"][0], fused_loras=[{"name": "ink", "weight": 0.5}])
    config = load_app_config(dict(tiny_args, models=[model] + tiny_args["models"][1:]))
    sd = config.model("stable-diffusion-2-1")
    (fused,) = sd.pipeline_spec().fused_loras
    assert (fused.name, fused.source, fused.weight) == ("ink", "tiny:lora/sd21/ink", 0.5)
    assert [a.name for a in sd.requestable_loras] == ["pastel", "grain"]
    with pytest.raises(ConfigError, match="fused_loras"):
        bad = dict(tiny_args["models"][0], fused_loras=[{"name": "nope"}])
        load_app_config(dict(tiny_args, models=[bad] + tiny_args["models"][1:]))


def test_the_config_sizes_the_slots_by_max_loras_per_request_unless_told(tiny_args):
    from serve_app.config import ConfigError, load_app_config

    def spec(**fields):
        model = dict(tiny_args["models"][0], **fields)
        config = load_app_config(dict(tiny_args, models=[model] + tiny_args["models"][1:]))
        return config.model("stable-diffusion-2-1").pipeline_spec()

    plain = spec()
    assert plain.lora_slots == 2 and plain.lora_rank is None  # the tiny profile: 2 a request
    told = spec(lora_slots=2, lora_rank=16, max_loras_per_request=1)
    assert (told.lora_slots, told.lora_rank) == (2, 16)
    for bad in ({"lora_slots": 1}, {"lora_slots": 3}):  # below a request's, above the loaded
        with pytest.raises(ConfigError, match="lora_slots"):
            spec(**bad)
