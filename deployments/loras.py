"""LoRA adapters of a model replica: loaded once, kept up to a limit, activated per batch.

A job names its adapters (:class:`~deployments.contract.LoraRef`: name, source, file,
weight). The replica's :class:`LoraCache`, always on the replica's one pipeline thread:

- **loads** an adapter the first time a batch needs it, through diffusers' own
  ``pipe.load_lora_weights(source, weight_name=..., adapter_name=...)`` (peft layers injected
  into the UNet and text encoders), so real Hub LoRAs, local folders and the tiny seeded ones
  (``tiny:lora/<family>/<name>``) take one path;
- **evicts** the least recently used adapter that the batch does not need
  (``pipe.delete_adapters``) before a load would keep more than ``spec.max_loaded_loras``;
- **activates** exactly the batch's adapters and weights before each pipeline call
  (``enable_lora`` + ``set_adapters``), or turns LoRA off (``disable_lora``) for a batch
  without any, so that such a batch gives the pixels of a pipeline that never loaded one.

Jobs batch only with jobs of the same adapter set (:func:`lora_batch_key` is part of the
batch key), so one pipeline call runs one adapter set. The image-to-image and inpainting
pipelines are ``from_pipe`` views sharing the base pipeline's UNet and text encoders: the
adapters loaded and activated through the base pipeline are the ones they run with.

A load that fails (no such files, another model's shapes, not a LoRA) raises
:class:`~deployments.errors.InvalidJobError` (``param="loras"``) naming the adapter, after
removing whatever part of it was injected, so the pipeline keeps serving.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from deployments.contract import LoraRef, PipelineSpec
from deployments.errors import InvalidJobError
from deployments.loading import resolve_source

logger = logging.getLogger("ray.serve")

# The highest LoRA rank a compiled replica prepares for (enable_lora_hotswap's target_rank).
HOTSWAP_TARGET_RANK = 128


def lora_batch_key(refs: Sequence[LoraRef]) -> tuple:
    """The part of a job's batch key that its adapters make: jobs batch together only with
    the same adapters (names, files) at the same weights. Sorted by name, as they are
    activated, so that the order a client listed them in changes nothing."""
    return tuple(sorted((ref.name, ref.source, ref.weight_name, float(ref.weight)) for ref in refs))


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


def _reason(exc: BaseException, limit: int = 300) -> str:
    """Why a load failed, in a line a client can read (the full error goes to the log)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "size mismatch" in text or "mismatched_sizes" in text:
        return "its layer shapes do not fit this model (a LoRA of another model?)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LoraCache:
    """The LoRA adapters loaded in one replica's pipeline (see the module docstring).

    ``loads`` and ``evictions`` list the adapter names in the order they were loaded and
    evicted (for tests and benchmarks; ``metrics``, when given, counts them for Prometheus).
    ``loaded`` holds the loaded adapters, least recently used first.
    """

    def __init__(self, pipe: Any, spec: PipelineSpec, device: str = "cpu", metrics: Any = None):
        self.pipe = pipe
        self.model = spec.name
        self.capacity = max(1, spec.max_loaded_loras)
        self.metrics = metrics
        # job adapter name -> (pipeline adapter name, source, weight_name); LRU first.
        self.loaded: OrderedDict[str, tuple[str, str, str | None]] = OrderedDict()
        self.loads: list[str] = []
        self.evictions: list[str] = []
        self._active: tuple | None = None  # what the pipeline runs with now; None: unknown
        self._layers = False  # whether LoRA layers were ever injected into the modules
        if spec.compile and device == "cuda" and hasattr(pipe, "enable_lora_hotswap"):
            # A compiled UNet (loading.py) recompiles when the layers under it change. Diffusers
            # must be told before the first adapter loads: enable_lora_hotswap pads that
            # adapter to target_rank and turns its scalings into tensors, so that later
            # adapters of up to that rank and other weights can be hot-swapped in
            # (load_lora_weights(..., hotswap=True)) without recompiling. Adapters loaded
            # under new names, as this cache does, still inject new layers: each new adapter
            # set costs a recompile (Dynamo falls back to eager after its recompile limit).
            # A CPU replica never compiles; the unit tests run this preparation on a CPU
            # pipeline (tests/unit/test_loras.py), not on a compiled UNet.
            pipe.enable_lora_hotswap(target_rank=HOTSWAP_TARGET_RANK)

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
            source = resolve_source(ref.source)
            if (os.path.isabs(source) or source.startswith((".", "~"))) and not Path(source).exists():
                # Else diffusers reads it as a Hub id and reports something else.
                raise FileNotFoundError("no such file or folder")
            with warnings.catch_warnings():
                # peft warns at every adapter after the first that a model holds several, and
                # when diffusers removes the part of a failed adapter it had just activated.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                warnings.filterwarnings("ignore", message=".*was active which is now deleted")
                self.pipe.load_lora_weights(source, weight_name=ref.weight_name, adapter_name=name)
            if not any(name in names for names in self.pipe.get_list_adapters().values()):
                # Diffusers only warns when no key of the file names a layer of this model.
                raise ValueError("none of its layers is a layer of this model")
        except Exception as exc:
            self._discard(name)
            if _device_failure(exc):
                raise
            logger.warning("%s: LoRA adapter %s from %s failed to load: %s", self.model, ref.name,
                           ref.source, exc)
            raise InvalidJobError(
                f"LoRA adapter {ref.name!r} cannot be loaded into {self.model}: "
                f"{_reason(exc)}", param="loras") from exc
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
        pipe.load_lora_weights(resolve_source(ref.source), weight_name=ref.weight_name,
                               adapter_name=name)
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[ref.weight for ref in refs])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    logger.info("fused LoRA adapters into the weights: %s",
                ", ".join(f"{r.name} ({r.weight:g})" for r in refs))
