"""Loading a replica's model: device and dtype, the pipeline itself.

Weights come through :func:`deployments.sources.local_path`, so the same
``from_pretrained`` calls serve real Hub weights, local folders and any stand-in kind that
supplies weights (tests exercise the production loading path); a kind that supplies a whole
model instead (:func:`deployments.sources.stand_in_model`) replaces the load.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from deployments.contract import PipelineSpec
from deployments.runtime.loras import fuse_loras, probe_lora_stack
from deployments.sources import local_path, stand_in_model

logger = logging.getLogger("ray.serve")

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def select_device(spec: PipelineSpec) -> tuple[str, torch.dtype]:
    """CUDA in ``spec.dtype`` when this replica has a GPU, else CPU in ``spec.cpu_dtype``
    (float32 by default; bfloat16 runs the half-precision paths on CPU).

    On CPU, torch gets ``spec.cpu_threads`` threads (default: every core): Ray sets
    OMP_NUM_THREADS to the replica's reserved CPUs, one thread for a fraction of a CPU,
    which halves the speed of a small CPU replica on a 2-core machine.
    """
    if torch.cuda.is_available():
        return "cuda", _DTYPES[spec.dtype]
    if spec.dtype != spec.cpu_dtype:
        logger.info("%s: no GPU on this replica, running on CPU in %s", spec.name, spec.cpu_dtype)
    return "cpu", _DTYPES[spec.cpu_dtype]


def cpu_threads(spec: PipelineSpec) -> int:
    return spec.cpu_threads or os.cpu_count() or 1


def _from_pretrained_kwargs(source: str, dtype: torch.dtype, revision: str | None = None,
                            variant: str | None = None) -> dict[str, Any]:
    """``source`` is a :func:`local_path`: a folder here loads without asking the Hub."""
    kwargs: dict[str, Any] = {"dtype": dtype}
    if revision:
        kwargs["revision"] = revision
    if variant:
        kwargs["variant"] = variant
    if Path(source).is_dir():
        kwargs["local_files_only"] = True
    return kwargs


# torch.compile of the UNet. No CUDA graphs ("reduce-overhead" records graphs that belong
# to the thread that recorded them and to one shape each); dynamic shapes, so a new batch
# size or image size does not recompile (Dynamo gives up after 8 recompiles).
COMPILE_OPTIONS: dict[str, Any] = {"mode": "max-autotune-no-cudagraphs", "dynamic": True,
                                   "fullgraph": True}


def load_stand_in(spec: PipelineSpec):
    """The whole model a stand-in source kind supplies (a benchmark's simulated
    accelerator, say), as (model, device), or None when the source has weights to load."""
    model = stand_in_model(spec.source, spec.family)
    if model is None:
        return None
    logger.info("%s: STAND-IN %s (not a model: never serve it to users)", spec.name, spec.source)
    return model, "cpu"


def load_pipeline(pipeline_cls: Any, spec: PipelineSpec):
    """Load ``pipeline_cls`` from ``spec.source`` onto this replica's device.

    The same ``from_pretrained`` call serves real Hub weights, a local folder and any
    stand-in that supplies weights, so tests exercise the production loading path.
    """
    stand_in = load_stand_in(spec)
    if stand_in is not None:
        return stand_in
    device, dtype = select_device(spec)
    source = local_path(spec.source)
    # The variant is asked for on CPU too: a folder from `serve-app fetch` may hold only
    # the variant's weights (they are cast to this replica's dtype on load).
    kwargs = _from_pretrained_kwargs(source, dtype, spec.revision, spec.variant)
    if spec.vae:
        from diffusers import AutoencoderKL

        vae_source = local_path(spec.vae)
        kwargs["vae"] = AutoencoderKL.from_pretrained(vae_source,
                                                      **_from_pretrained_kwargs(vae_source, dtype))
    pipe = pipeline_cls.from_pretrained(source, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if spec.vae_tiling:
        pipe.vae.enable_tiling()
    if spec.vae_slicing:
        pipe.vae.enable_slicing()
    if spec.fused_loras:
        fuse_loras(pipe, spec.fused_loras)  # before moving and compiling: merged once
    if device == "cuda":
        # PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels).
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
        if spec.cpu_offload:
            pipe.enable_model_cpu_offload()
        else:
            pipe.to(device)
    else:
        pipe.to(device)
    if spec.loras or spec.hub_loras:
        # On the device, before compiling: a broken LoRA stack stops the start, not every request.
        probe_lora_stack(pipe, spec.name, spec.loras)
    if device == "cuda" and spec.compile:
        # In place (nn.Module.compile), not pipe.unet = torch.compile(pipe.unet): diffusers'
        # set_adapters, enable_lora and disable_lora act only on components that are still a
        # ModelMixin, and skip the OptimizedModule wrapper without a word, so a compiled
        # replica kept running the last adapter for requests without one.
        pipe.unet.compile(**COMPILE_OPTIONS)
    logger.info("%s: loaded %s from %s on %s (%s)", spec.name, pipeline_cls.__name__,
                spec.source, device, dtype)
    return pipe, device


def load_preview_decoder(spec: PipelineSpec, device: str):
    """The tiny autoencoder (``AutoencoderTiny``: TAESD, TAESDXL) that decodes stream previews."""
    from diffusers import AutoencoderTiny

    _, dtype = select_device(spec)
    source = local_path(spec.preview_decoder)
    decoder = AutoencoderTiny.from_pretrained(source, **_from_pretrained_kwargs(source, dtype))
    decoder = decoder.to(device).eval()
    logger.info("%s: stream previews decoded by %s", spec.name, spec.preview_decoder)
    return decoder
