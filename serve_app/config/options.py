"""Ray Serve's options of one deployment (``serve.deployment(...).options``), checked by
Serve's own schema.

Every option is Serve's, with the type and bounds of ``ray.serve.schema.DeploymentSchema``
(the actor's ``num_gpus``, ``num_cpus`` and ``resources``, written flat and gathered into
``ray_actor_options``, with those of its ``RayActorOptionsSchema``); the assembled options
are then validated by ``DeploymentSchema`` itself (its rules across options) and
``autoscaling_config`` by Serve's ``AutoscalingConfig``, each error naming its option. Ours
are only the defaults (serve_app/config/defaults.py), the options the app sets itself (an
unknown key here), and three shapes stricter than Serve's: a replica count without "auto",
custom resources as numbers, autoscaling keys Serve knows (it would drop a typo silently).
"""

from __future__ import annotations

import functools
import typing
from typing import Annotated, Any, Callable, Optional

from pydantic import Field, ValidationError, create_model, field_validator, model_validator
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema

from serve_app.config.base import Strict
from serve_app.config.defaults import DEPLOYMENT, SECTION_DEPLOYMENTS

# The actor's options written flat in `deployment`, gathered into ray_actor_options.
ACTOR_OPTIONS = ("num_gpus", "num_cpus", "resources")
# Serve's options this app sets itself: the name, the actor's options (from the flat ones
# above) and the replica's own arguments.
_SET_BY_THE_APP = {"name", "ray_actor_options", "user_config"}

# Where our shape is stricter than Serve's (which takes num_replicas "auto", any mapping as
# resources, and drops unknown autoscaling keys): the plain mapping is kept for autoscaling,
# checked by AutoscalingConfig below.
_OUR_SHAPES: dict[str, Any] = {
    "num_replicas": Annotated[int, Field(gt=0)],
    "resources": dict[str, float],
    "autoscaling_config": dict[str, Any],
}

# Our words for the options we give a default or a shape (docs/configuration.md says the
# same); every other option keeps Serve's own description.
_DESCRIPTIONS = {
    "num_gpus": "GPUs per replica; fractions share one GPU.",
    "num_cpus": "CPUs reserved per replica.",
    "resources": "Ray custom resources per replica, to pin replicas to the nodes that "
    "declare them (configs/cluster.yaml: the ingress takes 'cpu_node', which only the CPU "
    "workers declare, so it never takes a GPU worker's CPUs).",
    "num_replicas": "Fixed replica count; leave unset when autoscaling (one replica when "
    "neither is set).",
    "autoscaling_config": "Ray Serve autoscaling_config (min_replicas, max_replicas, "
    "target_ongoing_requests, ...).",
    "max_ongoing_requests": "Requests a replica works on at once (room for a batch).",
    "max_queued_requests": "Requests waiting for a replica before callers get 503; -1 is unbounded.",
}


def _bare(annotation: Any) -> Any:
    """``X`` of ``Optional[X]``: an option with our default takes no null."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        rest = tuple(arg for arg in args if arg is not type(None))
        return rest[0] if len(rest) == 1 else typing.Union[rest]
    return annotation


def _option(name: str, schema: type) -> tuple[Any, Any]:
    """One option as a field of ours: Serve's type and bounds (or our shape), our default
    (else none: Serve's own applies), a description."""
    field = schema.model_fields[name]
    kind = _OUR_SHAPES.get(name) or _bare(field.annotation)
    if name not in _OUR_SHAPES and field.metadata:
        kind = Annotated[(kind, *field.metadata)]
    description = _DESCRIPTIONS.get(name, f"Serve's own option: {field.description}")
    if name in DEPLOYMENT:
        return kind, Field(default=DEPLOYMENT[name], description=description)
    return Optional[kind], Field(default=None, description=description)


def _serve_check(schema: type, values: dict[str, Any]) -> None:
    """Validate ``values`` with Serve's ``schema``; a ValueError naming each bad option as
    it is written here."""
    try:
        schema.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = [str(part) for part in error["loc"]]
            if loc[:1] == ["ray_actor_options"]:
                loc = loc[1:]  # written flat here
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{'.'.join(loc)}: {message}" if loc else message)
        raise ValueError("; ".join(problems)) from None


class _Options(Strict):
    """What the options do, besides holding Serve's options (added below)."""

    @field_validator("autoscaling_config", check_fields=False)
    @classmethod
    def _check_autoscaling(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        unknown = sorted(set(value) - set(AutoscalingConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown autoscaling_config keys: {', '.join(unknown)}")
        _serve_check(AutoscalingConfig, value)  # min <= max, ...
        return value

    @model_validator(mode="after")
    def _serve_checks(self):
        _serve_check(DeploymentSchema, {"name": "check", **self.serve_options()})
        return self

    @property
    def scales_to_zero(self) -> bool:
        """Autoscaling down to no replica (``min_replicas: 0``): the first request starts one."""
        return self.autoscaling_config is not None and AutoscalingConfig(
            **self.autoscaling_config).min_replicas == 0

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``: the options as written, the actor's
        resources gathered into ``ray_actor_options``, one replica unless told otherwise."""
        actor = {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus,
                 **({"resources": dict(self.resources)} if self.resources else {})}
        options = self.model_dump(exclude_none=True, exclude=set(ACTOR_OPTIONS))
        if self.autoscaling_config is None and self.num_replicas is None:
            options["num_replicas"] = 1
        return {"ray_actor_options": actor, **options}


DeploymentOptions = create_model(
    "DeploymentOptions",
    __base__=_Options,
    __doc__="Ray Serve options of one deployment: Serve's own, with our defaults.",
    **{name: _option(name, RayActorOptionsSchema) for name in ACTOR_OPTIONS},
    **{name: _option(name, DeploymentSchema)
       for name in DeploymentSchema.model_fields if name not in _SET_BY_THE_APP},
)


def section_default(section: str) -> Callable[[], Any]:
    """The ``deployment`` of a section that leaves it out (``SECTION_DEPLOYMENTS``)."""
    return functools.partial(DeploymentOptions, **SECTION_DEPLOYMENTS[section])
