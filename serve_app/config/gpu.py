"""The GPU a config is sized for (``gpu``), and the memory sizes it is written in.

``parse_memory`` lives here, not with the capacity tool that also reads it: the config
checks ``gpu.memory`` when it is read, and the config may not import the operator tools.
It is our own because Kubernetes' sizes (``48Gi``) are not pydantic's ``ByteSize``'s.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from serve_app.config.base import Strict


_MEMORY_UNITS = {
    "": 1, "B": 1,
    "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
    "T": 10**12, "TB": 10**12,
    "KI": 2**10, "KIB": 2**10, "MI": 2**20, "MIB": 2**20, "GI": 2**30, "GIB": 2**30,
    "TI": 2**40, "TIB": 2**40,
}


def parse_memory(text: str) -> int:
    """Bytes of a memory size such as ``"24GiB"``, ``"80GB"``, ``"48Gi"`` or ``"16G"``
    (Kubernetes convention: G and GB are 10^9 bytes, Gi and GiB 2^30)."""
    value = str(text).strip()
    number = value.rstrip("KMGTBikmgtb ")
    unit = value[len(number):].strip().upper()
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if amount <= 0 or unit not in _MEMORY_UNITS:
        raise ValueError(f"memory {text!r}: expected a size such as '24GiB', '80GB' or '48Gi'")
    return int(amount * _MEMORY_UNITS[unit])


class GpuConfig(Strict):
    """The GPU a config is sized for (``serve-app capacity`` checks that it fits)."""

    name: str = Field(min_length=1, description="GPU model, e.g. 'NVIDIA L4' or 'NVIDIA A10G'.")
    memory: str = Field(
        description="Memory of one GPU, e.g. '24GiB' (GiB/Gi are 2^30 bytes, GB/G 10^9)."
    )

    @field_validator("memory")
    @classmethod
    def _check_memory(cls, value: str) -> str:
        parse_memory(value)
        return value

    @property
    def memory_bytes(self) -> int:
        return parse_memory(self.memory)
