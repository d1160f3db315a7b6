"""LoRA adapters of a model replica: loaded once, kept up to a limit, activated per batch.

A job names its adapters (:class:`~deployments.contract.LoraRef`: name, source, file,
weight). The replica's :class:`LoraCache`:

- **fetches**, on the event loop before the job queues, the file of each Hub adapter not
  here yet (:meth:`LoraCache.fetch`): on its own download threads, so that other batches run
  meanwhile and a caller that goes stops waiting; one download per file however many jobs
  name it; a Hub LoRA a request names is checked against ``max_hub_lora_bytes`` through the
  Hub's metadata first (:func:`fetch_hub_lora`). The pipeline thread never downloads.

Then, always on the replica's one pipeline thread, it:

- **loads** an adapter the first time a batch needs it, through diffusers' own
  ``pipe.load_lora_weights(folder, weight_name=..., adapter_name=...)`` (peft layers injected
  into the UNet and text encoders), so Hub LoRAs (from the Hub cache), local folders and
  stand-ins (``KIND:lora/<family>/<name>``, deployments/sources.py) take one path;
- **evicts** the least recently used adapter that the batch does not need
  (``pipe.delete_adapters``) before a load would keep more than ``spec.max_loaded_loras``;
- **activates** exactly the batch's adapters and weights before each pipeline call
  (``enable_lora`` + ``set_adapters``), or turns LoRA off (``disable_lora``) for a batch
  without any, so that such a batch gives the pixels of a pipeline that never loaded one.

Jobs batch only with jobs of the same adapter set (:func:`lora_batch_key` is part of the
batch key), so one pipeline call runs one adapter set. The image-to-image and inpainting
pipelines are ``from_pipe`` views sharing the base pipeline's UNet and text encoders: the
adapters loaded and activated through the base pipeline are the ones they run with.

Whose fault a failed load is decides its answer; either way whatever part of the adapter was
injected is removed first, so the pipeline keeps serving:

- the **server's** (:class:`~deployments.errors.ServerFaultError`, a 500): an adapter the
  config names (its files are the operator's), and for any adapter a library clash, a Hub
  that cannot be reached, anything not known to be the adapter's own doing;
- the **client's** (:class:`~deployments.errors.InvalidJobError`, ``param="loras"``, a 400):
  a Hub LoRA the request named that does not exist, has no ``.safetensors`` file or one over
  ``max_hub_lora_bytes``, is another model's (its shapes, or none of its layers, fit), or is
  not a LoRA file at all (:func:`client_fault`).

:func:`probe_lora_stack`, at replica start, loads the first configured adapter (or, with Hub
LoRAs only, a zero LoRA built from the pipeline's own layers) through the same calls as a
request's: a broken LoRA stack (a transformers release that refuses the installed peft) stops
the replica from starting, with a log line naming the versions, instead of failing every
request that names an adapter.

One module, over 400 lines: loading, activating, evicting and fusing share one cache of
loaded adapters and one set of peft calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, hf_hub_download

from deployments.contract import LoraRef, PipelineSpec
from deployments.errors import InvalidJobError, ServerFaultError
from deployments.sources import HUB, HUB_FILE, LOCAL, Source, local_path

logger = logging.getLogger("ray.serve")

# The highest LoRA rank a compiled replica prepares for (enable_lora_hotswap's target_rank).
HOTSWAP_TARGET_RANK = 128


def lora_batch_key(refs: Sequence[LoraRef]) -> tuple:
    """The part of a job's batch key that its adapters make: jobs batch together only with
    the same adapters (names, files) at the same weights. Sorted by name, as they are
    activated, so that the order a client listed them in changes nothing."""
    return tuple(sorted((ref.name, str(ref.source), ref.weight_name, float(ref.weight)) for ref in refs))


# peft keeps an adapter's layers in ModuleDicts (and ParameterDicts) keyed by its name.
_TAKEN_NAMES = frozenset(dir(torch.nn.ModuleDict())) | frozenset(dir(torch.nn.ParameterDict()))


def adapter_name(name: str) -> str:
    """The adapter name in the pipeline for a job's adapter ``name``: the name itself, unless
    peft cannot take it (a key of torch's ModuleDict: no '.', not an attribute of the dict
    such as ``half`` or ``to``), then a readable name with a hash of the original.
    """
    if name and "." not in name and name not in _TAKEN_NAMES:
        return name
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:48]
    return f"lora_{readable}_{hashlib.sha256(name.encode()).hexdigest()[:10]}"


def _device_failure(exc: BaseException) -> bool:
    """Errors of the GPU, not of the adapter: out of memory, a lost CUDA context."""
    return isinstance(exc, torch.OutOfMemoryError) or "CUDA error" in str(exc)


def adapter_source(ref: LoraRef) -> str:
    """What ``load_lora_weights`` takes for ``ref``: a stand-in's folder (built once by its
    source kind), a Hub id, or a local path, which must exist (else diffusers reads it as a Hub id and reports something
    else)."""
    source = local_path(ref.source)
    if ref.source.kind == LOCAL and not Path(source).exists():
        raise FileNotFoundError("no such file or folder")
    return source


# -- Hub files, fetched before a job reaches the pipeline thread ----------------------------

# Downloads of Hub LoRA files run on this many threads per replica: they wait on the network,
# so two let one slow repo not hold every other, while bounding what a replica fetches at once.
HUB_DOWNLOAD_WORKERS = 2

# diffusers' default LoRA file name, and the names its guess passes over (not LoRA weights).
LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"
_NOT_LORA_FILES = ("scheduler", "optimizer", "checkpoint")


def best_guess_weight_name(filenames: Iterable[str]) -> str | None:
    """The file of a Hub repo that ``load_lora_weights(repo)`` loads when no ``weight_name``
    is given, as diffusers guesses it (``diffusers.loaders.lora_base._best_guess_weight_name``,
    safetensors only: a pickled ``.bin`` is never loaded from a repo a request names): the
    ``.safetensors`` files not named for a scheduler, optimizer or checkpoint; of those,
    the ones ending in ``pytorch_lora_weights.safetensors`` if any; the first, in the Hub's
    order. None when there is none."""
    files = [name for name in filenames if name.endswith(".safetensors")
             and not any(part in name for part in _NOT_LORA_FILES)]
    files = [name for name in files if name.endswith(LORA_WEIGHT_NAME_SAFE)] or files
    return files[0] if files else None


class NoLoraFile(ValueError):
    """A Hub repo with no LoRA file to load (no ``.safetensors`` file, or not the one named)."""


class LoraTooLarge(ValueError):
    """A Hub LoRA file over the model's ``max_hub_lora_bytes``, by the Hub's metadata."""


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


def fetch_hub_lora(source: Source, weight_name: str | None, max_bytes: int | None = None) -> str:
    """Download the LoRA file of a Hub ``source`` (a repo id, or ``hf://`` one file of a repo)
    into the Hub cache and return its local path; nothing is read as a local folder.

    The file is ``weight_name``, or the one diffusers would choose
    (:func:`best_guess_weight_name`). With ``max_bytes`` (a Hub LoRA a request names) the
    repo's file list and sizes come first from the Hub's metadata
    (``repo_info(files_metadata=True)``): a file over ``max_bytes``, or not a
    ``.safetensors`` file, raises before anything is downloaded, and the download is pinned
    to the commit whose size was checked. An adapter the config names with its file is
    downloaded as named (from the cache alone when ``HF_HUB_OFFLINE`` is set).

    Blocking (network): the replica runs it on its download threads (:class:`LoraCache`)."""
    repo, revision, repo_type = source.repo_id, source.revision, source.repo_type
    wanted = source.path_in_repo if source.kind == HUB_FILE else weight_name
    if max_bytes is None and wanted is not None:
        return hf_hub_download(repo, wanted, revision=revision, repo_type=repo_type)
    info = HfApi().repo_info(repo, revision=revision, repo_type=repo_type, files_metadata=True)
    sizes = {sibling.rfilename: sibling.size for sibling in info.siblings or ()}
    name = wanted or best_guess_weight_name(sizes)
    if name is None:
        raise NoLoraFile("the repo has no .safetensors LoRA file")
    if name not in sizes:
        raise NoLoraFile(f"the repo has no file {name}")
    if max_bytes is not None:
        if not name.endswith(".safetensors"):
            raise NoLoraFile(f"{name} is not a .safetensors file")
        size = sizes[name]
        if size is None:  # the Hub's answer lacks what files_metadata asks for
            raise RuntimeError(f"the Hub did not report the size of {name}")
        if size > max_bytes:
            raise LoraTooLarge(f"its file {name} is {_mib(size)}; this server takes Hub LoRA "
                               f"files of at most {_mib(max_bytes)}")
    return hf_hub_download(repo, name, revision=info.sha or revision, repo_type=repo_type)


def lora_files(ref: LoraRef) -> tuple[str, str | None]:
    """What ``load_lora_weights`` takes for a configured adapter at replica start (the start
    probe, fused adapters): a Hub one is downloaded through :func:`fetch_hub_lora` (the same
    file a request's load would use), anything else is :func:`adapter_source`."""
    if ref.source.kind in (HUB, HUB_FILE):
        path = Path(fetch_hub_lora(ref.source, ref.weight_name))
        return str(path.parent), path.name
    return adapter_source(ref), ref.weight_name


class NotFetched(RuntimeError):
    """A Hub adapter reached the pipeline thread without its file (a bug of the caller)."""

    def __init__(self):
        super().__init__("its file was not downloaded before the pipeline call")


class NoLayerFits(ValueError):
    """A LoRA file loaded without error but none of its keys named a layer of this model
    (diffusers only warns then)."""

    def __init__(self):
        super().__init__("none of its layers is a layer of this model")


def _check_loaded(pipe: Any, name: str) -> None:
    if not any(name in names for names in pipe.get_list_adapters().values()):
        raise NoLayerFits()


# Messages of diffusers' and torch's failed loads that mean the adapter is wrong for this model.
_ADAPTER_FAULTS = ("size mismatch", "mismatched_sizes", "Invalid LoRA checkpoint")


def client_fault(exc: BaseException) -> bool:
    """Whether a Hub LoRA a request named failed to load for its own reasons: no such repo,
    revision or file on the Hub, not an id at all, no LoRA file or one over the size bound,
    not a readable safetensors file, or layers that are not this model's. Anything else (a
    library clash, no network, no memory) is the server's."""
    from huggingface_hub import errors as hub
    from safetensors import SafetensorError

    if isinstance(exc, hub.LocalEntryNotFoundError):
        return False  # not in the cache and the Hub not reachable: the server's network
    if isinstance(exc, (hub.RepositoryNotFoundError, hub.RevisionNotFoundError,
                        hub.RemoteEntryNotFoundError, hub.DisabledRepoError,
                        hub.HFValidationError, SafetensorError, NoLayerFits, NoLoraFile,
                        LoraTooLarge)):
        return True
    return any(text in str(exc) for text in _ADAPTER_FAULTS)


def _reason(exc: BaseException, limit: int = 300) -> str:
    """Why a load failed, in a line a client can read (the full error goes to the log)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "size mismatch" in text or "mismatched_sizes" in text:
        return "its layer shapes do not fit this model (a LoRA of another model?)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LoraCache:
    """The LoRA adapters loaded in one replica's pipeline, and the Hub files fetched for
    them (see the module docstring).

    ``loads`` and ``evictions`` list the adapter names in the order they were loaded and
    evicted (for tests and benchmarks; ``metrics``, when given, counts them for Prometheus).
    ``loaded`` holds the loaded adapters, least recently used first.
    """

    def __init__(self, pipe: Any, spec: PipelineSpec, device: str = "cpu", metrics: Any = None):
        self.pipe = pipe
        self.model = spec.name
        # (source, weight_name) of the adapters the config names: their failures are the server's.
        self.configured = frozenset((ref.source, ref.weight_name) for ref in spec.loras)
        self.capacity = max(1, spec.max_loaded_loras)
        self.metrics = metrics
        # job adapter name -> (pipeline adapter name, source, weight_name); LRU first.
        self.loaded: OrderedDict[str, tuple[str, str, str | None]] = OrderedDict()
        self.loads: list[str] = []
        self.evictions: list[str] = []
        self._active: tuple | None = None  # what the pipeline runs with now; None: unknown
        self._layers = False  # whether LoRA layers were ever injected into the modules
        # Hub adapters' files (fetch, on the event loop and the download threads): (source,
        # weight_name) -> the local file in the Hub cache, and the downloads under way.
        self.max_hub_bytes = spec.max_hub_lora_bytes
        self.fetched: dict[tuple[str, str | None], str] = {}
        self._downloads: dict[tuple[str, str | None], Future] = {}
        self._waiters: dict[tuple[str, str | None], int] = {}
        self._lock = threading.Lock()  # _downloads: the event loop and the download threads
        self._downloader = ThreadPoolExecutor(max_workers=HUB_DOWNLOAD_WORKERS,
                                              thread_name_prefix=f"{spec.name}-lora-download")
        if spec.compile and device == "cuda" and hasattr(pipe, "enable_lora_hotswap"):
            # A compiled UNet (loading.py) recompiles when the layers under it change. Diffusers
            # must be told before the first adapter loads: enable_lora_hotswap pads that
            # adapter to target_rank and turns its scalings into tensors, so that later
            # adapters of up to that rank and other weights can be hot-swapped in
            # (load_lora_weights(..., hotswap=True)) without recompiling. Adapters loaded
            # under new names, as this cache does, still inject new layers: each new adapter
            # set costs a recompile (Dynamo falls back to eager after its recompile limit).
            # The UNet is compiled in place at load (loading.py), before any adapter: its
            # first adapter is prepared on a compiled module, which diffusers refuses by
            # default; compiling is lazy and Dynamo recompiles for the new layers anyway, so
            # the check is turned off. A CPU replica never compiles; the unit tests run this
            # preparation on a CPU pipeline (tests/unit/test_loras.py), the GPU tests on a
            # compiled UNet (tests/unit/test_gpu.py).
            pipe.enable_lora_hotswap(target_rank=HOTSWAP_TARGET_RANK, check_compiled="ignore")

    # -- checks on the event loop, before a job is queued ------------------------------

    def check(self, refs: Sequence[LoraRef]) -> None:
        """Reject a job whose adapters this replica can never run together."""
        names = [ref.name for ref in refs]
        if len(set(names)) != len(names):
            raise InvalidJobError("loras names the same adapter twice", param="loras")
        if len(refs) > self.capacity:
            raise InvalidJobError(
                f"{self.model} keeps at most {self.capacity} LoRA adapters loaded; "
                f"the job asks for {len(refs)}", param="loras")

    async def fetch(self, refs: Sequence[LoraRef]) -> None:
        """Download the files of the Hub adapters of ``refs`` that are not here yet, on the
        replica's download threads (``HUB_DOWNLOAD_WORKERS``), before the job queues: other
        batches run meanwhile, a caller that goes stops waiting, and jobs that name the same
        file share one download. A Hub LoRA a request names is checked against
        ``max_hub_lora_bytes`` through the Hub's metadata before any download
        (:func:`fetch_hub_lora`). Raises as a failed load does (:meth:`_failure`)."""
        for ref in refs:
            if ref.source.kind not in (HUB, HUB_FILE):
                continue
            key = (str(ref.source), ref.weight_name)
            path = self.fetched.get(key)
            if path is not None and os.path.isfile(path):
                continue  # fetched before (the first revision seen stays until a restart)
            try:
                await self._download(ref, key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified as a load's failure is
                raise self._failure(ref, exc) from exc

    async def _download(self, ref: LoraRef, key: tuple[str, str | None]) -> None:
        with self._lock:
            future, new = self._downloads.get(key), False
            if future is None:
                bound = None if key in self.configured else self.max_hub_bytes
                future = self._downloader.submit(fetch_hub_lora, ref.source, ref.weight_name, bound)
                self._downloads[key] = future
                new = True
        if new:  # outside the lock: a download done already calls back at once, here
            future.add_done_callback(lambda done: self._downloaded(key, done))
        self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            # Shielded: a caller that goes does not cancel what other callers wait for.
            await asyncio.shield(asyncio.wrap_future(future))
        finally:
            self._waiters[key] -= 1
            if not self._waiters[key]:
                del self._waiters[key]
                # Nobody waits any more: a download not started yet is dropped (one that
                # runs cannot be stopped, and finishes into the cache for the next request).
                future.cancel()

    def _downloaded(self, key: tuple[str, str | None], future: Future) -> None:
        # On the download thread (or the event loop, for a download cancelled before it ran).
        with self._lock:
            if self._downloads.get(key) is future:
                del self._downloads[key]
            if not future.cancelled() and future.exception() is None:
                self.fetched[key] = future.result()

    def _files(self, ref: LoraRef) -> tuple[str, str | None]:
        """What ``load_lora_weights`` takes for ``ref`` on the pipeline thread: a Hub
        adapter's file as :meth:`fetch` left it in the Hub cache (its folder and name; never
        the Hub id, which diffusers would first read as a local folder), else
        :func:`adapter_source`."""
        if ref.source.kind in (HUB, HUB_FILE):
            path = self.fetched.get((str(ref.source), ref.weight_name))
            if path is None or not os.path.isfile(path):
                raise NotFetched()
            return str(Path(path).parent), Path(path).name
        return adapter_source(ref), ref.weight_name

    def _failure(self, ref: LoraRef, exc: BaseException) -> Exception:
        """The error a failed fetch or load of ``ref`` answers with: the client's (a 400
        naming ``loras``) for a Hub LoRA the request named failing for its own reasons
        (:func:`client_fault`), else the server's (a 500 ``lora_unavailable``)."""
        message = f"LoRA adapter {ref.name!r} cannot be loaded into {self.model}: {_reason(exc)}"
        if (ref.source, ref.weight_name) not in self.configured and client_fault(exc):
            logger.warning("%s: LoRA adapter %s from %s failed to load: %s", self.model,
                           ref.name, ref.source, exc)
            return InvalidJobError(message, param="loras")
        logger.error("%s: LoRA adapter %s from %s failed to load for the server's reasons "
                     "(%s): %s", self.model, ref.name, ref.source, lora_stack_versions(), exc)
        return ServerFaultError(f"{message} (a fault of the server, not of the request)",
                                code="lora_unavailable")

    # -- on the pipeline thread --------------------------------------------------------

    def use(self, refs: Sequence[LoraRef]) -> None:
        """Make the pipeline run with exactly ``refs`` (none: LoRA off) for the next call."""
        self.ensure(refs)
        self.activate(refs)

    def ensure(self, refs: Sequence[LoraRef]) -> None:
        """Load each adapter of ``refs`` not loaded yet, evicting the least recently used
        ones that ``refs`` does not need to stay within ``max_loaded_loras``."""
        self.check(refs)
        needed = {ref.name for ref in refs}
        for ref in refs:
            entry = self.loaded.get(ref.name)
            if entry is not None and entry[1:] != (ref.source, ref.weight_name):
                self._evict(ref.name)  # the same name now means other files: reload it
            if ref.name in self.loaded:
                self.loaded.move_to_end(ref.name)
                continue
            while len(self.loaded) >= self.capacity:
                # check() leaves at least one loaded adapter that this batch does not need.
                self._evict(next(name for name in self.loaded if name not in needed))
            self._load(ref)

    def activate(self, refs: Sequence[LoraRef]) -> None:
        """Activate exactly ``refs`` at their weights, or disable LoRA when there are none."""
        ordered = sorted(refs, key=lambda ref: ref.name)
        state = tuple((self.loaded[ref.name][0], float(ref.weight)) for ref in ordered)
        if state == self._active:
            return
        if not state:
            if self._layers:
                # The peft layers then run their base layer alone: the pixels of a pipeline
                # that never loaded an adapter (weight 0 gives them too).
                self.pipe.disable_lora()
        else:
            self.pipe.enable_lora()
            self.pipe.set_adapters([name for name, _ in state],
                                   adapter_weights=[weight for _, weight in state])
        self._active = state

    def _load(self, ref: LoraRef) -> None:
        name = adapter_name(ref.name)
        self._active = None  # loading activates the new adapter
        self._layers = True
        try:
            source, weight_name = self._files(ref)
            with warnings.catch_warnings():
                # peft warns at every adapter after the first that a model holds several, and
                # when diffusers removes the part of a failed adapter it had just activated.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                warnings.filterwarnings("ignore", message=".*was active which is now deleted")
                self.pipe.load_lora_weights(source, weight_name=weight_name, adapter_name=name)
            _check_loaded(self.pipe, name)
        except Exception as exc:
            self._discard(name)
            if _device_failure(exc):
                raise
            raise self._failure(ref, exc) from exc
        self.loaded[ref.name] = (name, ref.source, ref.weight_name)
        self.loads.append(ref.name)
        if self.metrics is not None:
            self.metrics.on_lora_load(ref.name)
        logger.info("%s: loaded LoRA adapter %s from %s (%d loaded)", self.model, ref.name,
                    ref.source, len(self.loaded))

    def _discard(self, name: str) -> None:
        """Remove what a failed load injected (the UNet's part may have loaded before the
        text encoder's failed); diffusers has already removed the failing component's."""
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*was active which is now deleted")
                self.pipe.delete_adapters(name)
        except Exception:  # noqa: BLE001 - best effort; the load's own error is reported
            logger.exception("%s: could not remove the half-loaded LoRA adapter %s", self.model, name)

    def _evict(self, ref_name: str) -> None:
        name = self.loaded.pop(ref_name)[0]
        self._active = None
        self.pipe.delete_adapters(name)
        self.evictions.append(ref_name)
        if self.metrics is not None:
            self.metrics.on_lora_eviction(ref_name)
        logger.info("%s: unloaded LoRA adapter %s", self.model, ref_name)


class LoraStackError(RuntimeError):
    """A replica's start-up LoRA load failed: its libraries clash, or its first configured
    adapter cannot be loaded."""


def lora_stack_versions() -> str:
    """``diffusers X, peft Y, transformers Z``: the libraries a LoRA load goes through."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return ", ".join(f"{name} {installed(name)}" for name in ("diffusers", "peft", "transformers"))


def probe_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """A rank-1 LoRA in diffusers' format whose B factors are zero (it changes nothing):
    one attention query projection of the UNet and of each text encoder the pipeline has."""
    state: dict[str, torch.Tensor] = {}
    for prefix, suffix in (("unet", ".to_q"), ("text_encoder", ".q_proj"), ("text_encoder_2", ".q_proj")):
        module = getattr(pipe, prefix, None)
        if module is None:
            continue
        path, layer = next((path, layer) for path, layer in module.named_modules()
                           if path.endswith(suffix) and isinstance(layer, torch.nn.Linear))
        like = {"dtype": layer.weight.dtype, "device": layer.weight.device}
        state[f"{prefix}.{path}.lora_A.weight"] = torch.zeros(1, layer.in_features, **like)
        state[f"{prefix}.{path}.lora_B.weight"] = torch.zeros(layer.out_features, 1, **like)
    return state


def probe_lora_stack(pipe: Any, model: str, configured: Sequence[LoraRef] = ()) -> None:
    """Prove at replica start that adapters load and switch in ``pipe``: the first of
    ``configured`` (the config's adapters; a stand-in's is built here), or else a zero LoRA on
    one attention layer of each LoRA-loadable module (:func:`probe_state_dict`), goes
    through the same ``load_lora_weights``, ``enable_lora``, ``set_adapters`` and
    ``disable_lora`` calls as a request's adapter; then every LoRA layer is removed again,
    leaving the model as loaded. Raises :class:`LoraStackError` naming the adapter and the
    library versions.

    Called by ``load_pipeline`` on the replica's device, before the UNet is compiled: the
    probe's layers never reach a compiled graph."""
    name = "_serve_app_probe"
    what = f"adapter {configured[0].name!r}" if configured else "a probe adapter"
    try:
        if configured:
            source, weight_name = lora_files(configured[0])
            pipe.load_lora_weights(source, weight_name=weight_name, adapter_name=name)
        else:
            pipe.load_lora_weights(probe_state_dict(pipe), adapter_name=name)
        _check_loaded(pipe, name)
        pipe.enable_lora()
        pipe.set_adapters([name], adapter_weights=[1.0])
        pipe.disable_lora()
        pipe.unload_lora_weights()
    except Exception as exc:
        message = (f"{model}: LoRA {what} cannot be loaded at start "
                   f"({lora_stack_versions()}): {_reason(exc)}. With a library clash, install "
                   "the tested set (pip install -c constraints.txt, README 'Dependencies'); "
                   "with a missing adapter, fix its source; or remove loras and "
                   "allow_hub_loras from this model's config.")
        logger.error(message)
        raise LoraStackError(message) from exc
    logger.info("%s: LoRA %s loaded and removed at start (%s)", model, what, lora_stack_versions())


def fuse_loras(pipe: Any, refs: Sequence[LoraRef]) -> None:
    """Merge a deployment's fixed adapter set into its weights, once, at load: each adapter
    loads through ``load_lora_weights``, ``set_adapters`` weighs them, ``fuse_lora`` adds
    their weighted deltas to the UNet's and text encoders' weights, and
    ``unload_lora_weights`` removes the LoRA layers. The model then runs at its plain speed
    (no LoRA matmuls per step) and per-request adapters still load on top."""
    if not refs:
        return
    names = []
    for ref in refs:
        name = adapter_name(ref.name)
        source, weight_name = lora_files(ref)
        pipe.load_lora_weights(source, weight_name=weight_name, adapter_name=name)
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[ref.weight for ref in refs])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    logger.info("fused LoRA adapters into the weights: %s",
                ", ".join(f"{r.name} ({r.weight:g})" for r in refs))
