"""The installed versions of the libraries that serving depends on, against the tested set.

``serve-app check`` prints them: each library's installed version, whether it is the one
``constraints.txt`` (the lock, README "Dependencies") pins, and the one clash known to break
serving: a transformers release whose PEFT integration refuses the installed peft.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The libraries a request goes through, in the order a reader thinks of them.
KEY_PACKAGES = ("torch", "diffusers", "transformers", "peft", "ray", "spandrel")
LOCK_FILE = Path(__file__).resolve().parents[2] / "constraints.txt"


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def locked_versions(path: Path = LOCK_FILE) -> dict[str, str] | None:
    """``{name: version}`` pinned by the lock, or None when there is no lock file (an
    install from a wheel rather than a checkout)."""
    if not path.is_file():
        return None
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, _, pinned = line.partition("==")
            pins[normalize(name.split("[", 1)[0])] = pinned.strip()
    return pins


@dataclass(frozen=True)
class VersionReport:
    lines: list[str]
    problems: list[str]  # clashes that break serving


def peft_clash() -> str | None:
    """The known clash: transformers >= 5.24 refuses peft below 0.22 in its PEFT integration
    (LoRA adapters), whatever pip allowed. None when the two agree (or one is missing)."""
    transformers_version, peft_version = installed("transformers"), installed("peft")
    if transformers_version is None or peft_version is None:
        return None
    try:
        from packaging.version import Version
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except Exception as exc:  # noqa: BLE001 - a transformers that does not even import
        return f"transformers {transformers_version} does not import its PEFT integration: {exc}"
    if Version(peft_version) < Version(MIN_PEFT_VERSION):
        return (f"transformers {transformers_version} needs peft >= {MIN_PEFT_VERSION}; "
                f"peft {peft_version} is installed: transformers' PEFT integration refuses it, "
                "so LoRA adapters do not work")
    return None


def version_report(lock: Path = LOCK_FILE) -> VersionReport:
    """Lines for ``serve-app check``: each key library's version and whether it is locked."""
    pins = locked_versions(lock)
    lines = [f"libraries (against {lock.name}):" if pins is not None else
             f"libraries (no {lock.name} here: an install outside a checkout is not compared):"]
    unlocked = False  # some key library is missing or not the locked version
    for name in KEY_PACKAGES:
        have = installed(name)
        want = pins.get(normalize(name)) if pins is not None else None
        if have is None:
            state = "NOT INSTALLED"
        elif pins is None:
            state = ""
        elif want is None:
            state = "not in the lock"
        elif have == want or have.split("+", 1)[0] == want:  # torch's local tags: 2.14.1+cu130
            state = "locked"
        else:
            state = f"NOT the locked {want}"
        unlocked |= have is None or state.startswith("NOT")
        lines.append(f"  {name:<13} {have or '-':<12} {state}".rstrip())
    problems = [clash] if (clash := peft_clash()) else []
    lines.extend(f"  PROBLEM: {problem}" for problem in problems)
    if pins is not None and unlocked:
        lines.append(f"  (install the tested set: python3 -m pip install -c {lock.name} -e .)")
    return VersionReport(lines, problems)
