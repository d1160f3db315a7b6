"""LoRA adapters in fixed slots of the UNet, and a weight per row for every adapter.

**Slots.** At replica start the UNet gets ``count`` LoRA adapters of its own, the *slots*
(peft adapters ``serve_app_slot_<i>`` added with ``unet.add_adapter``), each on the same
layers at the same rank: the layers and the highest rank of the configured adapters (or,
with none configured, the attention projections at ``DEFAULT_SLOT_RANK``). Their scalings
are made tensors (peft's ``prepare_model_for_compiled_hotswap``), so serving an adapter
copies its UNet weights and scalings into a slot in place (peft's
``hotswap_adapter_from_state_dict``, the call diffusers' ``load_lora_weights(...,
hotswap=True)`` makes): the UNet's modules never change after start, and a compiled UNet
is never recompiled for an adapter. An adapter of a higher rank, on layers the slots do not
have, or of another kind (DoRA, LoRA biases) does not fit (:class:`DoesNotFit`).

**Weights per row.** Every LoRA layer computes ``lora_B(lora_A(x)) * scaling`` for the whole
batch. A forward hook on each ``lora_A`` multiplies its output, row by row, by that row's
weight for the adapter (:class:`RowWeights`; 0 for a row that does not use it), so one call
serves rows of different adapters at different weights, and a row with no adapter gets
exactly the base model's output (its LoRA terms are zeros). peft's own mixed batches
(``adapter_names=[...]``) give a row one adapter at the adapter's one scale and split the
batch in Python by the names, a recompile per mix under ``torch.compile``; weights as
tensors cover combinations and per-request weights in one graph.

The same hooks weigh the rows of the text encoders' LoRA layers (their adapters load under
their own names: diffusers cannot hot-swap text encoders, and they are not compiled).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("ray.serve")

SLOT_PREFIX = "serve_app_slot_"
# The slots' rank when no adapter is configured to take it from (Hub LoRAs only): SD 2.1
# and SDXL LoRAs on the Hub are mostly of rank 4 to 64.
DEFAULT_SLOT_RANK = 64
# The layers slots cover when no adapter is configured: the attention projections that
# diffusers' LoRA training scripts target.
ATTENTION_LAYERS = (".to_q", ".to_k", ".to_v", ".to_out.0")


class DoesNotFit(ValueError):
    """An adapter's UNet part that the replica's slots cannot take."""


def _scale_rows(weights: RowWeights, name: str, module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
    # Every LoRA layer of the UNet and the text encoders takes its batch in its first dimension.
    rows = output.shape[0]
    scale = weights.tables[name][:rows].to(output.dtype)
    return output * scale.view(rows, *([1] * (output.dim() - 1)))


class RowWeights:
    """Each adapter's weight for each row of the next call, read by hooks on its ``lora_A``
    layers. Tables are long enough for ``rows`` rows (they grow if a call has more), live
    on the model's device, and are written in place (a compiled graph reads them as inputs)."""

    def __init__(self, rows: int):
        self.rows = max(1, rows)
        self.tables: dict[str, torch.Tensor] = {}
        self._written: dict[str, tuple] = {}  # what each table's first rows hold now

    def attach(self, model: torch.nn.Module, name: str) -> int:
        """Hook every ``lora_A`` of adapter ``name`` in ``model``; returns how many."""
        from peft.tuners.lora import LoraLayer

        hooked = 0
        for layer in model.modules():
            if isinstance(layer, LoraLayer) and name in layer.lora_A:
                lora_a = layer.lora_A[name]
                if name not in self.tables:
                    self.tables[name] = torch.zeros(self.rows, device=lora_a.weight.device)
                lora_a.register_forward_hook(functools.partial(_scale_rows, self, name))
                hooked += 1
        return hooked

    def set(self, name: str, weights: Sequence[float]) -> None:
        """Row ``i`` of the next call runs adapter ``name`` at ``weights[i]``."""
        table = self.tables.get(name)
        if table is None:
            return  # an adapter without layers here (a UNet-only adapter's text encoders)
        weights = tuple(float(weight) for weight in weights)
        if self._written.get(name) == weights:
            return  # the same rows as the last call (a step loop's calls): no copy to the device
        if len(weights) > table.numel():
            table = self.tables[name] = torch.zeros(len(weights), device=table.device)
        table[: len(weights)].copy_(torch.tensor(weights, dtype=table.dtype))
        self._written[name] = weights

    def forget(self, name: str) -> None:
        self.tables.pop(name, None)
        self._written.pop(name, None)


@dataclass(frozen=True)
class UNetAdapter:
    """An adapter's UNet part as the slots take it: peft's keys (``<layer>.lora_A.weight``),
    its config (ranks and alphas: the scalings), its highest rank and its layers."""

    state: dict
    config: Any
    rank: int
    layers: frozenset


def _strip(mapping: dict | None, prefix: str) -> dict | None:
    if not mapping:
        return None
    stripped = {key.removeprefix(prefix): value for key, value in mapping.items() if key.startswith(prefix)}
    return stripped or None


def unet_adapter(unet: torch.nn.Module, state_dict: dict, network_alphas: dict | None,
                 metadata: dict | None) -> UNetAdapter | None:
    """The UNet part of an adapter read by the pipeline's ``lora_state_dict``, in peft's
    format, converted and configured as diffusers' ``load_lora_adapter`` does; None when
    the adapter has no UNet layers."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    # diffusers' own LoraConfig from a state dict (private, pinned by constraints.txt): the
    # scalings must be the ones a plain load would give.
    from diffusers.utils.peft_utils import _create_lora_config

    prefix = "unet."
    state = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
    if not state:
        return None
    if "lora_A" not in next(iter(state)):
        state = convert_unet_state_dict_to_peft(state)
    ranks = {f"^{key}": value.shape[1] for key, value in state.items() if "lora_B" in key and value.ndim > 1}
    config = _create_lora_config(state, _strip(network_alphas, prefix), _strip(metadata, prefix), ranks,
                                 model_state_dict=unet.state_dict(), adapter_name="serve_app_candidate")
    layers = frozenset(key.split(".lora_", 1)[0] for key in state if ".lora_" in key)
    return UNetAdapter(state, config, max(ranks.values(), default=0), layers)


def default_layers(unet: torch.nn.Module) -> frozenset:
    """The attention projections of ``unet`` (the layers slots cover with no configured adapter)."""
    return frozenset(path for path, module in unet.named_modules()
                     if path.endswith(ATTENTION_LAYERS) and isinstance(module, torch.nn.Linear))


class UNetSlots:
    """``count`` adapter slots in ``unet`` on ``layers`` at ``rank`` (see the module
    docstring). ``assign`` puts adapters in slots (copying weights in place into the least
    recently used free slot) and pins them until ``release``; ``weigh`` sets the next call's
    weights per row and slot; ``activate`` turns on the slots a call uses (all of them when
    the UNet is compiled, where the active set is part of the graph)."""

    def __init__(self, unet: torch.nn.Module, count: int, rank: int, layers: frozenset,
                 weights: RowWeights):
        from peft import LoraConfig
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        self.unet, self.rank, self.layers, self.weights = unet, rank, frozenset(layers), weights
        self.names = [f"{SLOT_PREFIX}{index}" for index in range(count)]
        self.content: list[Any] = [None] * count  # the key of the adapter in each slot
        self.pins = [0] * count
        self._used = [0] * count  # when each slot last served, for least-recently-used
        self._clock = 0
        self.swaps = 0
        if not self.layers:
            raise ValueError("LoRA slots need at least one layer")
        for name in self.names:
            # lora_B starts at zeros: an empty slot adds nothing.
            unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(self.layers)),
                             adapter_name=name)
        # Scalings as tensors, written in place by a swap (a float would be a graph constant).
        prepare_model_for_compiled_hotswap(unet, check_compiled="ignore")
        for name in self.names:
            weights.attach(unet, name)
        self._active: tuple | None = None
        logger.info("LoRA: %d slots of rank %d on %d UNet layers", count, rank, len(self.layers))

    @property
    def compiled(self) -> bool:
        return getattr(self.unet, "_compiled_call_impl", None) is not None

    def check(self, adapter: UNetAdapter) -> None:
        """Raise :class:`DoesNotFit` unless ``adapter`` can be copied into a slot."""
        if adapter.rank > self.rank:
            raise DoesNotFit(f"its rank {adapter.rank} is above this server's LoRA rank {self.rank}")
        outside = adapter.layers - self.layers
        if outside:
            raise DoesNotFit(f"it has {len(outside)} UNet layers outside this server's LoRA slots "
                             f"(e.g. {sorted(outside)[0]})")
        if getattr(adapter.config, "use_dora", False) or getattr(adapter.config, "lora_bias", False):
            raise DoesNotFit("DoRA and LoRA biases are not served")
        if any(".lora_A." not in key and ".lora_B." not in key for key in adapter.state):
            raise DoesNotFit("it has weights other than LoRA factors")

    def assign(self, adapters: dict[Any, UNetAdapter]) -> dict[Any, int]:
        """The slot of each adapter (key -> UNet part), copying in those not in a slot yet;
        pins them until :meth:`release`. The caller keeps the adapters in use within the
        slots (the batchers count them)."""
        slots: dict[Any, int] = {}
        for key in adapters:
            if key in self.content:
                slots[key] = self.content.index(key)
        for key, adapter in adapters.items():
            if key in slots:
                continue
            free = [i for i in range(len(self.names)) if not self.pins[i] and i not in slots.values()]
            if not free:
                raise RuntimeError("more adapters in use than LoRA slots")  # the batchers prevent it
            index = min(free, key=lambda i: (self.content[i] is not None, self._used[i]))
            self._swap(index, key, adapter)
            slots[key] = index
        self._clock += 1
        for index in slots.values():
            self.pins[index] += 1
            self._used[index] = self._clock
        return slots

    def release(self, slots: dict[Any, int]) -> None:
        for index in slots.values():
            self.pins[index] -= 1

    def evict(self, key: Any) -> None:
        """Forget ``key``'s place (its weights stay until another adapter takes the slot)."""
        if key in self.content:
            index = self.content.index(key)
            if not self.pins[index]:
                self.content[index] = None

    def _swap(self, index: int, key: Any, adapter: UNetAdapter) -> None:
        from peft.utils.hotswap import hotswap_adapter_from_state_dict

        self.check(adapter)
        name = self.names[index]
        state = {}
        for weight_key, value in adapter.state.items():
            head, tail = weight_key.rsplit(".", 1)  # "<layer>.lora_A" and "weight"
            state[f"{head}.{name}.{tail}"] = value
        self.content[index] = None
        try:
            with torch.no_grad():
                # Layers the adapter lacks are zeroed; scalings are filled in place.
                hotswap_adapter_from_state_dict(self.unet, state, name, adapter.config)
        except Exception:
            self._clear(index)
            raise
        self.content[index] = key
        self.swaps += 1

    def _clear(self, index: int) -> None:
        """Zero a slot whose copy failed half-way: it adds nothing again."""
        from peft.tuners.lora import LoraLayer

        name = self.names[index]
        with torch.no_grad():
            for layer in self.unet.modules():
                if isinstance(layer, LoraLayer) and name in layer.lora_B:
                    layer.lora_B[name].weight.zero_()

    def activate(self, used: Sequence[int]) -> None:
        """Run the next calls with slots ``used`` (none: the base model's layers alone).
        A compiled UNet has every slot on, their weights 0 for rows that do not use them, or
        none: two graphs in all, whatever the adapters (the active set is a graph guard)."""
        used = tuple(sorted(set(used)))
        state = (("all",) if used else ()) if self.compiled else used
        if state == self._active:
            return
        if state == ():
            self.unet.disable_adapters()
        else:
            self.unet.enable_adapters()
            self.unet.set_adapter(self.names if state == ("all",) else [self.names[i] for i in state])
        self._active = state

    def weigh(self, rows: Sequence[dict[int, float]]) -> None:
        """Row ``i`` of the next UNet call runs slot ``s`` at ``rows[i].get(s, 0)``."""
        for index, name in enumerate(self.names):
            self.weights.set(name, [row.get(index, 0.0) for row in rows])
