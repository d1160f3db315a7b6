"""What every section of the app config shares: strict models and the weights-source field."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, WithJsonSchema

from deployments.sources import Source


class Strict(BaseModel):
    """A config section: an unknown key is an error naming its path, not a silent typo."""

    model_config = ConfigDict(extra="forbid")


# A weights source, parsed once here (deployments/sources.py) and written back as its text.
SourceField = Annotated[
    Source,
    BeforeValidator(Source.parse),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "description": "Hub id, local folder, hf://ID[@REV]/PATH, "
                    "or KIND:NAME of an installed source kind (tiny:, sim:)."}),
]
