"""LoRA adapters of a model replica: loaded once, kept up to a limit, served per row of a call.

A job names its adapters (:class:`~deployments.contract.LoraRef`: name, source, file,
weight). The replica's :class:`LoraCache`:

- **fetches**, on the event loop before the job queues, the file of each Hub adapter not
  here yet (:meth:`LoraCache.fetch`): on its own download threads, so that other batches run
  meanwhile and a caller that goes stops waiting; one download per file however many jobs
  name it; a Hub LoRA a request names is checked against ``max_hub_lora_bytes`` through the
  Hub's metadata first (:func:`fetch_hub_lora`). The pipeline thread never downloads.

Then, always on the replica's pipeline thread (in step mode: the job's own, holding the
device), it:

- **loads** an adapter the first time a call needs it: ``pipe.lora_state_dict`` reads its
  file (Hub LoRAs from the Hub cache, local folders and stand-ins, ``KIND:lora/<family>/<name>``
  in deployments/sources.py, take one path); its UNet part is kept, converted as diffusers'
  ``load_lora_adapter`` converts it (:func:`~deployments.runtime.lora_slots.unet_adapter`),
  and its text-encoder layers load under its own name (``load_lora_into_text_encoder``);
- **evicts** the least recently used adapter that the call does not need
  (its text-encoder layers deleted, its UNet part dropped) before a load would keep more than
  ``spec.max_loaded_loras``;
- **serves** a call's adapters (:meth:`LoraCache.acquire`): each one's UNet part is copied in
  place into one of the UNet's fixed slots (deployments/runtime/lora_slots.py: no layer is
  added or removed after start, so a compiled UNet is not recompiled), and every row of the
  call runs its own job's adapters at its own weights, in the UNet and the text encoders
  (weights per row, by hooks on the LoRA layers). A row without adapters gets the pixels of a
  pipeline that never loaded one.

Jobs of different adapters and weights share one call (request mode) or one UNet call (step
mode); only the number of distinct adapters in a call is bounded, by the slots
(:func:`lora_identity` is what the batchers count). The image-to-image and inpainting
pipelines are ``from_pipe`` views sharing the base pipeline's UNet and text encoders: the
slots and adapters are the ones they run with.

Whose fault a failed load is decides its answer; either way whatever part of the adapter was
injected is removed first, so the pipeline keeps serving:

- the **server's** (:class:`~deployments.errors.ServerFaultError`, a 500): an adapter the
  config names (its files are the operator's), and for any adapter a library clash, a Hub
  that cannot be reached, anything not known to be the adapter's own doing;
- the **client's** (:class:`~deployments.errors.InvalidJobError`, ``param="loras"``, a 400):
  a Hub LoRA the request named that does not exist, has no ``.safetensors`` file or one over
  ``max_hub_lora_bytes``, is another model's (its shapes, or none of its layers, fit), does
  not fit the slots (a higher rank, other layers: ``DoesNotFit``), or is not a LoRA file at
  all (:func:`client_fault`). A job whose adapter fails leaves its call; the others run.

:func:`probe_lora_stack`, at replica start, loads the first configured adapter (or, with Hub
LoRAs only, a zero LoRA built from the pipeline's own layers) through the same calls as a
request's: a broken LoRA stack (a transformers release that refuses the installed peft) stops
the replica from starting, with a log line naming the versions, instead of failing every
request that names an adapter.

One module, over 400 lines: loading, serving, evicting and fusing share one cache of
loaded adapters and one set of diffusers and peft calls.
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
from dataclasses import dataclass, field
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, hf_hub_download

from deployments.contract import LoraRef, PipelineSpec
from deployments.runtime.lora_slots import (DEFAULT_SLOT_RANK, DoesNotFit, RowWeights, UNetAdapter,
                                            UNetSlots, default_layers, unet_adapter)
from deployments.errors import InvalidJobError, ServerFaultError
from deployments.sources import HUB, HUB_FILE, LOCAL, Source, local_path

logger = logging.getLogger("ray.serve")

def lora_identity(refs: Sequence[LoraRef]) -> frozenset:
    """The adapters a job uses, as the batchers count them against a replica's LoRA slots:
    names and files, not weights (rows of one call run each at its own weight)."""
    return frozenset((ref.name, str(ref.source), ref.weight_name) for ref in refs)


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
                        hub.HFValidationError, SafetensorError, NoLayerFits, NoLoraFile, DoesNotFit,
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
        # job adapter name -> the loaded adapter (its UNet part, text-encoder layers); LRU first.
        self.loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self.loads: list[str] = []
        self.evictions: list[str] = []
        # Hub adapters' files (fetch, on the event loop and the download threads): (source,
        # weight_name) -> the local file in the Hub cache, and the downloads under way.
        self.max_hub_bytes = spec.max_hub_lora_bytes
        self.fetched: dict[tuple[str, str | None], str] = {}
        self._downloads: dict[tuple[str, str | None], Future] = {}
        self._waiters: dict[tuple[str, str | None], int] = {}
        self._lock = threading.Lock()  # _downloads: the event loop and the download threads
        self._downloader = ThreadPoolExecutor(max_workers=HUB_DOWNLOAD_WORKERS,
                                              thread_name_prefix=f"{spec.name}-lora-download")
        # Adapters' text-encoder layers and the UNet's slots weigh each row by these.
        self.weights = RowWeights(2 * max(spec.max_batch_images, spec.images_in_flight))
        self._text_layers = False  # whether a text encoder holds LoRA layers
        self._text_active: tuple | None = None  # the text encoders' adapters on now
        self.slot_count = max(1, spec.lora_slots)
        # The UNet's slots: made at start when requests may name adapters (the config names
        # some, or allows Hub LoRAs), so that a compiled UNet is compiled with them; else
        # at the first job that names one (callers other than the ingress).
        self.spec = spec
        self.slots: UNetSlots | None = None
        if spec.loras or spec.hub_loras:
            self._slots()

    def _slots(self) -> UNetSlots | None:
        """The UNet's slots, made on first need; None for a UNet that is not a torch module."""
        if self.slots is None and isinstance(getattr(self.pipe, "unet", None), torch.nn.Module):
            self.slots = self._make_slots(self.spec)
        return self.slots

    def _make_slots(self, spec: PipelineSpec) -> UNetSlots:
        """The UNet's slots, on the layers and at the highest rank of the configured
        adapters (each read once here), or the attention projections at
        ``DEFAULT_SLOT_RANK`` with none; ``spec.lora_rank`` sets the rank. An adapter that
        cannot be read now is left for its first request to report (the start-up probe has
        already proven the first)."""
        unet, parts = self.pipe.unet, []
        for ref in spec.loras:
            try:
                source, weight_name = lora_files(ref)
                if ref.source.kind in (HUB, HUB_FILE):  # its first request loads this file
                    self.fetched[(str(ref.source), ref.weight_name)] = str(Path(source) / weight_name)
                state, alphas, metadata = self.pipe.lora_state_dict(
                    source, weight_name=weight_name, return_lora_metadata=True,
                    unet_config=self._unet_config())
                part = unet_adapter(unet, state, alphas, metadata)
            except Exception as exc:  # noqa: BLE001 - reported when a request names it
                logger.warning("%s: LoRA adapter %s cannot be read at start: %s", spec.name, ref.name, exc)
                continue
            if part is not None:
                parts.append(part)
        layers = frozenset().union(*(part.layers for part in parts)) or default_layers(unet)
        rank = spec.lora_rank or max((part.rank for part in parts), default=DEFAULT_SLOT_RANK)
        return UNetSlots(unet, self.slot_count, rank, layers, self.weights)

    # -- checks on the event loop, before a job is queued ------------------------------

    def check(self, refs: Sequence[LoraRef]) -> None:
        """Reject a job whose adapters this replica can never run together."""
        names = [ref.name for ref in refs]
        if len(set(names)) != len(names):
            raise InvalidJobError("loras names the same adapter twice", param="loras")
        if len(refs) > min(self.capacity, self.slot_count):
            raise InvalidJobError(
                f"{self.model} runs at most {min(self.capacity, self.slot_count)} LoRA adapters "
                f"in one call; the job asks for {len(refs)}", param="loras")

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

    def acquire(self, groups: Sequence[Sequence[LoraRef]]) -> LoraLease:
        """Make the adapters of ``groups`` (one per job, in row order) ready for one call:
        loaded (:meth:`ensure`), their UNet parts in slots (pinned until :meth:`release`),
        the text encoders' adapters on with each job's weights for its rows. Returns the
        lease whose ``rows`` are each group's slot weights (slot -> weight).

        A job whose adapters fail to load is left out: its error is in ``lease.errors``
        at its index, and the others run (a mixed batch is not failed by one bad adapter)."""
        keep = {ref.name for refs in groups for ref in refs}
        errors: dict[int, BaseException] = {}
        for index, refs in enumerate(groups):
            try:
                self.ensure(refs, keep=keep)
            except Exception as exc:  # noqa: BLE001 - that job's answer; the others run
                errors[index] = exc
        parts = {}
        for index, refs in enumerate(groups):
            if index not in errors:
                for ref in refs:
                    entry = self.loaded[ref.name]
                    if entry.unet is not None:
                        parts[entry.key] = entry.unet
        slots = self.slots.assign(parts) if self.slots is not None and parts else {}
        rows: list[dict[int, float]] = []
        for index, refs in enumerate(groups):
            weights: dict[int, float] = {}
            if index not in errors:
                for ref in refs:
                    key = self.loaded[ref.name].key
                    if key in slots:
                        weights[slots[key]] = weights.get(slots[key], 0.0) + float(ref.weight)
            rows.append(weights)
        return LoraLease(rows, slots, errors)

    def release(self, lease: LoraLease) -> None:
        if self.slots is not None:
            self.slots.release(lease.slots)

    def encode_with(self, groups: Sequence[tuple[Sequence[LoraRef], int]]) -> None:
        """Weigh the text encoders' rows for the next prompts: each group (a job's adapters,
        its images) in row order; twice over, since a pipeline encodes the prompts and the
        negative prompts in calls of the same rows. The adapters of no group are off."""
        if not self._text_layers:
            return
        rows = [refs for refs, images in groups for _ in range(images)]
        names = sorted({self.loaded[ref.name].adapter for refs in rows for ref in refs
                        if ref.name in self.loaded and self.loaded[ref.name].text})
        for name in names:
            per_row = [sum(float(ref.weight) for ref in refs
                           if ref.name in self.loaded and self.loaded[ref.name].adapter == name)
                       for refs in rows]
            self.weights.set(name, per_row * 2)
        self._activate_text(tuple(names))

    def weigh_unet(self, groups: Sequence[tuple[dict[int, float], int]]) -> None:
        """Weigh the next UNet call's rows: each group (slot weights, rows) in row order;
        only the slots some row uses are on (all of them when the UNet is compiled)."""
        if self.slots is None:
            return
        rows = [weights for weights, count in groups for _ in range(count)]
        self.slots.weigh(rows)
        self.slots.activate({slot for weights in rows for slot, weight in weights.items()})

    def use(self, refs: Sequence[LoraRef], images: int = 1, guided: bool = True) -> LoraLease:
        """One job's adapters for a pipeline call of ``images`` images (tests and simple
        callers): acquire, weigh the text encoders and the UNet's rows."""
        lease = self.acquire([refs])
        if lease.errors:
            self.release(lease)
            raise lease.errors[0]
        self.encode_with([(refs, images)])
        self.weigh_unet([(lease.rows[0], images * (2 if guided else 1))])
        return lease

    def ensure(self, refs: Sequence[LoraRef], keep: set[str] | frozenset = frozenset()) -> None:
        """Load each adapter of ``refs`` not loaded yet, evicting the least recently used
        ones that ``refs`` and ``keep`` do not name to stay within ``max_loaded_loras``."""
        self.check(refs)
        needed = {ref.name for ref in refs} | set(keep)
        for ref in refs:
            entry = self.loaded.get(ref.name)
            if entry is not None and entry.key != (ref.source, ref.weight_name):
                self._evict(ref.name)  # the same name now means other files: reload it
            if ref.name in self.loaded:
                self.loaded.move_to_end(ref.name)
                continue
            while len(self.loaded) >= self.capacity:
                spare = next((name for name in self.loaded if name not in needed), None)
                if spare is None:
                    break  # everything loaded is in use by this call: one over, for now
                self._evict(spare)
            self._load(ref)

    def _activate_text(self, names: tuple) -> None:
        from diffusers.utils.peft_utils import set_adapter_layers

        if names == self._text_active:
            return
        for encoder in self._encoders():
            if getattr(encoder, "peft_config", None) is None:
                continue
            if not names:
                set_adapter_layers(encoder, enabled=False)
                continue
            set_adapter_layers(encoder, enabled=True)
            for layer in encoder.modules():
                if hasattr(layer, "set_adapter") and hasattr(layer, "lora_A"):
                    layer.set_adapter(list(names))
        self._text_active = names

    def _unet_config(self) -> Any:
        """What ``lora_state_dict`` maps a Kohya/SGM LoRA's blocks by (as load_lora_weights does)."""
        unet = getattr(self.pipe, "unet", None)
        return getattr(unet, "config", None) if isinstance(unet, torch.nn.Module) else None

    def _encoders(self) -> list[Any]:
        return [module for key in ("text_encoder", "text_encoder_2")
                if isinstance(module := getattr(self.pipe, key, None), torch.nn.Module)]

    def _load(self, ref: LoraRef) -> None:
        name = adapter_name(ref.name)
        text = False
        try:
            source, weight_name = self._files(ref)
            with warnings.catch_warnings():
                # peft warns at every adapter after the first that a model holds several.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                state, alphas, metadata = self.pipe.lora_state_dict(
                    source, weight_name=weight_name, return_lora_metadata=True,
                    unet_config=self._unet_config())
                if not all("lora" in key for key in state):
                    raise ValueError("Invalid LoRA checkpoint: its keys are not LoRA layers")
                unet = None
                if self._slots() is not None:
                    unet = unet_adapter(self.pipe.unet, state, alphas, metadata)
                    if unet is not None:
                        self.slots.check(unet)
                for encoder_key, encoder in (("text_encoder", getattr(self.pipe, "text_encoder", None)),
                                             ("text_encoder_2", getattr(self.pipe, "text_encoder_2", None))):
                    if encoder is None or not any(key.startswith(f"{encoder_key}.") for key in state):
                        continue
                    self.pipe.load_lora_into_text_encoder(
                        state, network_alphas=alphas, text_encoder=encoder, prefix=encoder_key,
                        lora_scale=1.0, adapter_name=name, metadata=metadata, _pipeline=self.pipe)
                    if self.weights.attach(encoder, name):
                        text = True
                        self._text_layers = True
                        self._text_active = None
            if unet is None and not text and self.slots is not None:
                raise NoLayerFits()
        except Exception as exc:
            self._discard(name)
            if _device_failure(exc):
                raise
            raise self._failure(ref, exc) from exc
        self.loaded[ref.name] = _Loaded(name, (ref.source, ref.weight_name), unet, text)
        self.loads.append(ref.name)
        if self.metrics is not None:
            self.metrics.on_lora_load(ref.name)
        logger.info("%s: loaded LoRA adapter %s from %s (%d loaded)", self.model, ref.name,
                    ref.source, len(self.loaded))

    def _discard(self, name: str) -> None:
        """Remove what a failed load put into the text encoders (the first may have loaded
        before the second failed)."""
        from diffusers.utils.peft_utils import delete_adapter_layers

        self.weights.forget(name)
        for encoder in self._encoders():
            if name in (getattr(encoder, "peft_config", None) or {}):
                try:
                    delete_adapter_layers(encoder, name)
                except Exception:  # noqa: BLE001 - best effort; the load's own error is reported
                    logger.exception("%s: could not remove the half-loaded LoRA adapter %s", self.model, name)
        self._text_active = None

    def _evict(self, ref_name: str) -> None:
        entry = self.loaded.pop(ref_name)
        if entry.text:
            self._discard(entry.adapter)
        if self.slots is not None:
            self.slots.evict(entry.key)
        self.evictions.append(ref_name)
        if self.metrics is not None:
            self.metrics.on_lora_eviction(ref_name)
        logger.info("%s: unloaded LoRA adapter %s", self.model, ref_name)


@dataclass
class _Loaded:
    """A loaded adapter: its name in the text encoders, its files, its UNet part (copied
    into a slot when a call uses it), and whether the text encoders hold layers of it."""

    adapter: str
    key: tuple
    unet: UNetAdapter | None
    text: bool


@dataclass
class LoraLease:
    """What :meth:`LoraCache.acquire` prepared for one call: each job's slot weights (slot
    -> weight, in the call's job order), the slots it pinned, the jobs left out (index ->
    their error)."""

    rows: list[dict[int, float]]
    slots: dict
    errors: dict[int, BaseException] = field(default_factory=dict)


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
