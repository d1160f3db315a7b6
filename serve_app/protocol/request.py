"""The one normalized request: :class:`ImageRequest`, what every front converts its wire
shape into (``to_request()``), and the request-level rules every front shares: sizes,
image counts, seeds and LoRA weights.

This module imports neither torch, Ray nor any web framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from serve_app.protocol.sizes import SIZE_PATTERN, parse_size
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

# ---------------------------------------------------------------------------------------
# Wire bounds: the one table of the ceilings every front declares on its fields (OpenAI's
# routes, Livepeer's, Stability's gRPC, the jobs), so that nothing unbounded is parsed or
# planned. The fronts derive their bounds from here (the bounded types below, or these
# numbers in Stability's checks of its protobuf fields), never retype them. Each model's own
# limits (its config's ``limits:``, checked at planning) are within them; the config refuses
# a limit above its ceiling.
# ---------------------------------------------------------------------------------------

MAX_N = 10
# A LoRA adapter's weight (its scale): 0 leaves the model as it is, 1 is the adapter as
# trained, negative values push away from it.
LORA_WEIGHT_MIN, LORA_WEIGHT_MAX = -2.0, 2.0
# torch generators take seeds below 2**64; image i of a request uses seed + i.
MAX_SEED = 2**63 - 1
# A seed the service draws for a request without one: every image's seed (seed + i) stays
# below 2**32, like the seeds other services show and Stability's uint32 Artifact.seed.
DRAWN_SEED_LIMIT = 2**32
# Denoising steps of a schedule: the served schedulers are trained on 1000 timesteps and
# refuse (DDIM) or repeat (Euler) more; a model's limits hold it lower.
MAX_STEPS = 1000
# Classifier-free guidance scale (and Stability's cfg_scale).
MAX_GUIDANCE = 50.0
# The x4 upscaler's noise_level: its pipeline's max_noise_level.
MAX_NOISE_LEVEL = 350
# Output width or height asked for in pixels (an upscale's, Livepeer's); a model's sizes
# and pixel limits hold them lower.
MIN_SIDE, MAX_SIDE = 8, 16384
# Longest prompt or negative prompt; ``ingress.max_prompt_chars`` (at most this) applies.
MAX_PROMPT_CHARS = 10_000
# Names: models, aliases, upscalers, adapters, users.
MAX_NAME_CHARS = 256
# Adapters named in one request; a model's ``max_loras_per_request`` (at most this) applies.
MAX_LORAS = 16
# ``loras`` sent as JSON text (multipart forms, Livepeer): MAX_LORAS names and weights.
MAX_LORAS_JSON_CHARS = MAX_LORAS * (MAX_NAME_CHARS + 64)
# Streamed previews a request may ask for.
MAX_PARTIAL_IMAGES = 3
# jpeg and webp quality (OpenAI's output_compression).
MAX_COMPRESSION = 100

# The table's bounds as the types wire fields declare (``n: ImageCount = Field(default=1)``).
# A seed: one form from the wire to the replica (None until the service draws one, planning's
# ``draw_seed``); image i of a request uses seed + i, or its own (Stability's per-sample seeds).
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
ImageCount = Annotated[int, Field(ge=1, le=MAX_N)]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Guidance = Annotated[float, Field(ge=0, le=MAX_GUIDANCE)]
# An output width or height in pixels.
Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE)]
# How far an image-to-image call moves from its input (the share of the schedule it runs).
Strength = Annotated[float, Field(gt=0, le=1)]
# A refiner chain's share of the steps run by its base: each expert must get some.
HighNoiseFrac = Annotated[float, Field(gt=0, lt=1)]
NoiseLevel = Annotated[int, Field(ge=0, le=MAX_NOISE_LEVEL)]
Compression = Annotated[int, Field(ge=0, le=MAX_COMPRESSION)]
PartialImages = Annotated[int, Field(ge=0, le=MAX_PARTIAL_IMAGES)]


def _check_size(value: str | None) -> str | None:
    if value is not None and value != "auto":
        parse_size(value)
    return value


def _check_prompt(value: str) -> str:
    if not value.strip():
        raise ValueError("prompt must not be blank")
    return value


# "WIDTHxHEIGHT" or "auto"; and a prompt that is not only whitespace.
# Their JSON-schema patterns say the same, for client generators and fuzzers.
PROMPT_PATTERN = r"\S"
SizeField = Annotated[str | None, AfterValidator(_check_size),
                      Field(json_schema_extra={"pattern": SIZE_PATTERN})]
PromptField = Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS), AfterValidator(_check_prompt),
                        Field(json_schema_extra={"pattern": PROMPT_PATTERN})]
# Other texts of a request: a negative prompt, an upscaler's prompt.
TextField = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
# A model, upscaler or user name.
NameField = Annotated[str, Field(max_length=MAX_NAME_CHARS)]


# ---------------------------------------------------------------------------------------
# LoRA adapters of a request, declared once as pydantic types
# ---------------------------------------------------------------------------------------

LoraSet = tuple[tuple[str, float | None], ...]

AdapterName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS, pattern=r"\S")]
LoraWeightValue = Annotated[
    float, Field(ge=LORA_WEIGHT_MIN, le=LORA_WEIGHT_MAX, allow_inf_nan=False, strict=True)
]


class LoraWeight(BaseModel):
    """One adapter of a request and its weight (omitted: the adapter's default)."""

    model_config = ConfigDict(extra="forbid")

    name: AdapterName = Field(description="Adapter name.")
    weight: LoraWeightValue | None = Field(
        default=None,
        description=f"Its weight, {LORA_WEIGHT_MIN} to {LORA_WEIGHT_MAX}; omitted: its default.",
    )


# ``loras`` on the wire: a map of name to weight, or a list of {"name", "weight"}; at most
# MAX_LORAS of them.
Loras = (Annotated[dict[AdapterName, LoraWeightValue | None], Field(max_length=MAX_LORAS)]
         | Annotated[list[LoraWeight], Field(max_length=MAX_LORAS)])
_LORAS = TypeAdapter(Loras)


def _unique(pairs: LoraSet) -> LoraSet:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("loras names the same adapter twice")
    return pairs


def lora_set(value: Any) -> LoraSet:
    """``loras`` as ``((name, weight or None), ...)``, from a validated :data:`Loras`."""
    if not value:
        return ()
    if isinstance(value, dict):
        pairs = tuple((name, None if w is None else float(w)) for name, w in value.items())
    else:
        pairs = tuple((entry.name, entry.weight) for entry in value)
    return _unique(pairs)


def lora_set_from_json(text: str | None) -> LoraSet:
    """``loras`` sent as JSON text (multipart forms, Livepeer's runner): validated as
    :data:`Loras` (``""`` is none). Raises ValueError with pydantic's reason."""
    if text is None or not text.strip():
        return ()
    if len(text) > MAX_LORAS_JSON_CHARS:
        raise ValueError(f"loras is {len(text)} characters of JSON; the most is {MAX_LORAS_JSON_CHARS}")
    try:
        return lora_set(_LORAS.validate_json(text))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:])  # [0] is the union branch
        if first["type"] == "json_invalid":
            raise ValueError(
                'loras must be a JSON map of adapter to weight, such as {"ink": 0.8}, or a '
                'list such as [{"name": "ink", "weight": 0.8}]'
            ) from None
        raise ValueError(f"loras{'.' + where if where else ''}: {first['msg']}") from None


@dataclass(frozen=True)
class ImageRequest:
    """A request as planning takes it, whichever front and wire shape it came in: each wire
    model converts itself (``to_request``). Uploads travel beside it, decoded."""

    task: Literal["generate", "edit", "variation", "upscale"]
    prompt: str = ""
    # Prompts for a model's further text encoders (SDXL's second), from Livepeer's
    # 'first | second' prompts; planning refuses them for a model with fewer encoders.
    more_prompts: tuple[str, ...] = ()
    more_negative_prompts: tuple[str, ...] = ()
    model: str | None = None
    n: int = 1
    size: str | None = None
    negative_prompt: str | None = None
    # The seed of image 0 (image i uses seed + i); None until the service draws one. Its
    # rules against n are planning's (``_seeds``), checked once.
    seed: int | None = None
    # A seed for each of the n images (Stability's per-sample seeds), instead of ``seed``.
    seeds: tuple[int, ...] = ()
    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    high_noise_frac: float | None = None
    strength: float | None = None
    noise_level: int | None = None
    width: int | None = None
    height: int | None = None
    upscale: str | None = None
    stream: bool = False
    partial_images: int | None = None
    loras: LoraSet = ()
    moderation: str = "auto"
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int | None = None
    # Who asks: the hash of its API key (``protocol.keys.owner_of``), set by the front from the
    # request's one Authorization header, "" without one; planning checks what this key may do.
    owner: str = ""
