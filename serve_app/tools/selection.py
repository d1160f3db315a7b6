"""Which files of a source its loader needs, decided on a listing (a local folder's files
or a Hub repo's): the libraries' own choice wherever they make one.

- a pipeline (``model_index.json``): the files ``DiffusionPipeline.download`` takes, from
  diffusers' own helpers (:func:`pipeline_files`);
- one model folder: its configuration files and the weights diffusers'
  ``variant_compatible_siblings`` picks (:func:`model_files`);
- one file (spandrel): that file.

What stays ours is what the libraries never say, because they download what exists: which
files a component cannot load without (its class's configuration file, a tokenizer's
vocabulary, weights, every shard an index names).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from huggingface_hub.utils import filter_repo_objects

from serve_app.tools.hub import HubUnreachable

MODEL_INDEX = "model_index.json"


@dataclass
class Selection:
    """The files of a source its loader needs, and what is missing."""

    files: list[str] = field(default_factory=list)  # relative paths, present
    missing: list[str] = field(default_factory=list)  # relative paths (or a description)
    problems: list[str] = field(default_factory=list)  # errors other than a missing file
    notes: list[str] = field(default_factory=list)  # worth saying, not an error
    pipeline_class: str | None = None

    @property
    def usable(self) -> bool:
        return not self.missing and not self.problems

    def _need(self, path: str, present: set[str]) -> bool:
        if path in present:
            if path not in self.files:
                self.files.append(path)
            return True
        self.missing.append(path)
        return False


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers warns of a variant found in some components only; the check says so in a note."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class PipelineFiles:
    """What ``DiffusionPipeline.download`` would take of a pipeline repo's listing."""

    files: tuple[str, ...]  # the files, sorted
    variant_files: frozenset[str]  # the weights (and indexes) of the asked variant
    model_folders: frozenset[str]  # components with weight files
    safetensors: bool  # every model component has safetensors (else .bin throughout)


def _ignore_patterns(files: list[str], model_folders: set[str], passed: Iterable[str],
                     variant: str | None) -> list[str]:
    # diffusers 0.42's private _get_ignore_patterns, as DiffusionPipeline.download calls it
    # (use_safetensors left to its default: safetensors when every component has them, else
    # the pickled .bin; never flax, ONNX on ONNX pipelines only, none here). Its public part,
    # is_safetensors_compatible, decides only the first half.
    from diffusers.pipelines.pipeline_loading_utils import _get_ignore_patterns

    return _get_ignore_patterns(list(passed), model_folders, files, use_safetensors=True,
                                allow_pickle=True, use_onnx=None, is_onnx=False,
                                use_flashpack=False, variant=variant)


def _take(files: Iterable[str], allow: list[str], ignore: list[str]) -> list[str]:
    # What DiffusionPipeline.download keeps, with huggingface_hub's own pattern filter
    # (snapshot_download's): index files of ignored weights go too.
    ignore = ignore + [f"{pattern}.index.*json" for pattern in ignore]
    return sorted(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))


def pipeline_files(files: Iterable[str], index: dict[str, Any], variant: str | None = None,
                   passed: Iterable[str] = ()) -> PipelineFiles:
    """The files of a pipeline listing that ``DiffusionPipeline.download`` takes (diffusers
    0.42, ``pipeline_utils.py``), from its own helpers: ``filter_model_files``,
    ``variant_compatible_siblings`` and ``_get_ignore_patterns``. ``download`` has no dry
    run and fetches into the Hub cache only, so the allow patterns it builds are built here
    the same way (custom pipeline code and connected pipelines aside: never loaded here).

    Raises ValueError (diffusers') when a ``variant`` is asked that no file has.
    """
    from diffusers import DiffusionPipeline
    from diffusers.pipelines.pipeline_loading_utils import (
        CUSTOM_PIPELINE_FILE_NAME,
        filter_model_files,
        variant_compatible_siblings,
    )
    from diffusers.schedulers.scheduling_utils import SCHEDULER_CONFIG_NAME
    from diffusers.utils import CONFIG_NAME
    from diffusers.utils.constants import TRANSFORMERS_COMPONENT_AUX_FILES

    passed = list(passed)
    names = sorted(set(files) - set(index.get("_ignore_files", [])))
    folder_names = [k for k, v in index.items() if isinstance(v, list) and k != "_class_name"]
    model_folders = {os.path.split(f)[0] for f in filter_model_files(names)
                     if os.path.split(f)[0] in folder_names}
    ignore = _ignore_patterns(names, model_folders, passed, variant)
    with _quiet_diffusers():
        model_files, variant_files = variant_compatible_siblings(names, variant=variant,
                                                                 ignore_patterns=ignore)
    allow = list(model_files)
    allow += [f"{k}/*" for k in folder_names if k not in model_folders]
    allow += [f"{k}/{CONFIG_NAME}" for k in model_folders]
    allow += [SCHEDULER_CONFIG_NAME, CONFIG_NAME, DiffusionPipeline.config_name,
              CUSTOM_PIPELINE_FILE_NAME]
    allow = [p for p in allow if not (len(p.split("/")) == 2 and p.split("/")[0] in passed)]
    allow += TRANSFORMERS_COMPONENT_AUX_FILES
    return PipelineFiles(tuple(_take(names, allow, ignore)), frozenset(variant_files),
                         frozenset(model_folders), "*.safetensors" not in ignore)


def model_files(files: Iterable[str], variant: str | None = None) -> list[str]:
    """The weight files (and shard indexes) at the root of one model's folder that its
    ``from_pretrained`` reads, chosen as diffusers chooses a component's: safetensors when
    there are any, else .bin; the variant's when asked and present."""
    from diffusers.pipelines.pipeline_loading_utils import variant_compatible_siblings

    root = sorted(f for f in files if "/" not in f)
    ignore = _ignore_patterns(root, set(), (), variant)
    with _quiet_diffusers():
        chosen, _ = variant_compatible_siblings(root, variant=variant, ignore_patterns=ignore)
    return _take(chosen, ["*"], ignore)


# What a component's class reads, as its library names the files.
_CONFIG, _WEIGHTS, _VOCABULARY = "config", "weights", "vocabulary"


def _class_needs(cls: type) -> dict[str, Any]:
    """The files a loadable class cannot load without: its configuration file, the name of
    its safetensors weights (models), its vocabulary files (tokenizers)."""
    import diffusers
    import transformers
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from transformers.tokenization_utils_base import FULL_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE
    from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME, SAFE_WEIGHTS_NAME

    if issubclass(cls, diffusers.ModelMixin):
        return {_CONFIG: cls.config_name, _WEIGHTS: SAFETENSORS_WEIGHTS_NAME}
    if issubclass(cls, transformers.PreTrainedModel):
        return {_CONFIG: CONFIG_NAME, _WEIGHTS: SAFE_WEIGHTS_NAME}
    if issubclass(cls, diffusers.ConfigMixin):  # schedulers, guiders
        return {_CONFIG: cls.config_name}
    if issubclass(cls, transformers.PreTrainedTokenizerBase):
        # tokenizer.json alone, or the files of the tokenizer's own vocabulary.
        vocabulary = tuple(sorted(n for n in getattr(cls, "vocab_files_names", {}).values()
                                  if n != FULL_TOKENIZER_FILE))
        return {_CONFIG: TOKENIZER_CONFIG_FILE, _VOCABULARY: (FULL_TOKENIZER_FILE, vocabulary)}
    if issubclass(cls, (transformers.ImageProcessingMixin, transformers.FeatureExtractionMixin)):
        return {_CONFIG: IMAGE_PROCESSOR_NAME}
    return {}


def _is_index(name: str) -> bool:
    base = PurePosixPath(name).name
    return base.endswith(".json") and ".index." in base


def _weights_in(folder: str, chosen: Iterable[str]) -> list[str]:
    """The weight files (diffusers' ``filter_model_files``) of one component folder."""
    from diffusers.pipelines.pipeline_loading_utils import filter_model_files

    return [f for f in filter_model_files(list(chosen)) if str(PurePosixPath(f).parent) == folder]


def _check_shards(chosen: Iterable[str], present: set[str], read_json, selection: Selection) -> None:
    # A sharded checkpoint loads only with every shard its index names; the loaders find
    # out while loading, the download takes what is there.
    for index in (f for f in chosen if _is_index(f)):
        if read_json is None:
            continue
        prefix = str(PurePosixPath(index).parent)
        prefix = "" if prefix == "." else f"{prefix}/"
        try:
            shards = set(read_json(index).get("weight_map", {}).values())
        except HubUnreachable:
            raise
        except Exception:  # an unreadable index is the loader's error to report
            continue
        selection.missing += sorted(prefix + s for s in shards if prefix + s not in present)


def _select_pipeline(present: set[str], read_json, variant: str | None, passed: tuple[str, ...],
                     selection: Selection) -> None:
    from diffusers.pipelines.pipeline_loading_utils import simple_get_class_obj

    if not selection._need(MODEL_INDEX, present):
        return
    try:
        index = read_json(MODEL_INDEX) if read_json else None
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except HubUnreachable:
        raise
    except Exception as exc:
        selection.problems.append(f"{MODEL_INDEX} unreadable: {exc}")
        return
    selection.pipeline_class = index.get("_class_name")
    try:
        chosen = pipeline_files(present, index, variant, passed)
    except ValueError:  # diffusers refuses a variant that no component has
        selection.problems.append(f"variant {variant!r} not found: no component has "
                                  f"*.{variant}.safetensors (or .bin) weights")
        return
    selection.files = list(chosen.files)
    for name, entry in index.items():
        # Components are [library, class]; [null, null] is a component left out, and the
        # other keys are pipeline settings (requires_safety_checker, ...).
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue
        if None in entry or name in passed:
            continue
        library, class_name = entry
        try:
            cls = simple_get_class_obj(library, class_name)
        except (ImportError, AttributeError, ValueError) as exc:
            selection.problems.append(f"{name}: {library}.{class_name} cannot be loaded here "
                                      f"({str(exc).splitlines()[0]})")
            continue
        needs = _class_needs(cls) if isinstance(cls, type) else {}
        if _CONFIG in needs:
            selection._need(f"{name}/{needs[_CONFIG]}", present)
        if _VOCABULARY in needs:
            whole, parts = needs[_VOCABULARY]
            if f"{name}/{whole}" not in present and not (
                    parts and all(f"{name}/{p}" in present for p in parts)):
                alternative = f" (or {' + '.join(parts)})" if parts else ""
                selection.missing.append(f"{name}/{whole}{alternative}")
        if _WEIGHTS in needs:
            weights = _weights_in(name, chosen.files)
            if not weights:
                selection.missing.append(f"{name}/{needs[_WEIGHTS]} (weights)")
            elif variant is not None and not chosen.variant_files.intersection(weights):
                selection.notes.append(f"{name}: no {variant} weights, the default ones load")
    if not chosen.safetensors and any(f.endswith(".bin") for f in chosen.files):
        selection.notes.append("a component has no safetensors weights: diffusers takes the "
                               ".bin weights of every component")
    _check_shards(chosen.files, present, read_json, selection)


def _select_model(present: set[str], read_json, variant: str | None,
                  config_files: Iterable[str], selection: Selection) -> None:
    for config in config_files:
        selection._need(config, present)
    try:
        chosen = model_files(present, variant)
    except ValueError:
        chosen = []
        selection.problems.append(f"variant {variant!r} not found")
    weights = [f for f in chosen if not _is_index(f)]
    if not weights and not selection.problems:
        selection.missing.append("diffusion_pytorch_model.safetensors or model.safetensors (weights)")
    selection.files += [f for f in chosen if f not in selection.files]
    _check_shards(chosen, present, read_json, selection)


def select_files(
    layout: str,
    files: Iterable[str],
    read_json: Callable[[str], Any] | None = None,
    *,
    variant: str | None = None,
    config_files: Iterable[str] = ("config.json",),
    filename: str | None = None,
    passed: Iterable[str] = (),
) -> Selection:
    """The files of a source (a folder's or a repo's listing) that its loader needs.

    ``layout`` is the registry's: ``pipeline`` (what ``DiffusionPipeline.download`` takes:
    :func:`pipeline_files`; each component's class says what it cannot load without),
    ``model`` (``config_files`` and the weights :func:`model_files` picks at the root) or
    ``single-file`` (``filename``). ``read_json(path)`` reads a file of the listing
    (``model_index.json``, shard indexes). ``passed`` names pipeline components the loader
    passes in (not loaded from the source).
    """
    present = set(files)
    selection = Selection()
    if layout == "single-file":
        if filename is None:
            raise ValueError("single-file layout needs a filename")
        selection._need(filename, present)
        return selection
    if layout == "model":
        _select_model(present, read_json, variant, config_files, selection)
        return selection
    if layout != "pipeline":
        raise ValueError(f"unknown layout {layout!r}")
    _select_pipeline(present, read_json, variant, tuple(passed), selection)
    return selection
