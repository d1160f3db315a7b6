"""The wheels an offline GPU machine needs to run ``python3 -m benchmarks.gpu_run``, downloaded
into .whl/.

    python3 scripts/gpu_wheels.py [--dest .whl]

The offline H100/H200 (docs/benchmarks.md#the-gpu-run) has Python 3.12 with PyTorch,
transformers, accelerate and peft, and no network: whatever else the run imports travels with
the working tree as wheels, which the run installs with ``pip install --no-index --no-deps``
(nothing is resolved there). ``WHEELS`` is that list: diffusers and spandrel, pydantic (the
capacity estimate reads request sizes through serve_app.protocol.sizes, which imports it), and
every requirement of theirs, transitively, that the machine's package list
(``scripts/gpu_device_packages.txt``) lacks, or holds at a version it may not satisfy (no
version known where the requirement names one: pydantic wants typing-extensions>=4.16).
``unmet`` checks the list against the installed distributions' metadata
(tests/unit/test_benchmarks_gpu.py, here; gpu_run.py, there, against what is installed).

Each wheel is the lock's version (constraints.txt), for CPython 3.12 on manylinux x86-64,
downloaded without its dependencies (they are on the list). Wheels in the folder that are not
on the list are removed: two versions of one package stop the whole install there. The
machine takes the working tree and the wheels in at most 64 MiB: the script adds up the
wheels and the files git would send (tracked, and untracked but not ignored) and fails over it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
DEVICE_PACKAGES = ROOT / "scripts" / "gpu_device_packages.txt"

# What benchmarks/gpu_run.py imports that the machine lacks, and what those need.
ROOTS = ("diffusers", "spandrel", "pydantic")
WHEELS = ("diffusers", "spandrel", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
          "typing-extensions", "importlib-metadata", "zipp", "lazy-importer")
TRAVEL_LIMIT = 64 * 1024**2  # the most the GPU machine takes in: working tree and wheels
# The machine's interpreter, for requirement markers (python_version < "3.15" and the like).
DEVICE_ENVIRONMENT = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix", "extra": "",
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """The lock's ``name==version`` lines, by canonical name."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if match:
            found[canonicalize_name(match[1])] = match[2]
    return found


def device_packages(path: Path = DEVICE_PACKAGES) -> dict[str, str | None]:
    """The machine's packages by canonical name, with their version where known."""
    found: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[canonicalize_name(name)] = version or None
    return found


def installed_versions() -> dict[str, str]:
    """Every distribution this interpreter sees, by canonical name (the first on the path)."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        found.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    return found


def requirements(name: str, environment: dict[str, str] | None = None) -> list[Requirement]:
    """The requirements of installed distribution ``name`` that apply in ``environment``
    (default: this interpreter's), extras left out."""
    found = []
    for text in importlib.metadata.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate(environment or {"extra": ""}):
            found.append(requirement)
    return found


def unmet(roots: tuple[str, ...], carried: dict[str, str], present: dict[str, str | None],
          environment: dict[str, str] | None = None) -> list[str]:
    """What ``roots`` need, transitively, that neither ``carried`` (wheels: name -> version)
    nor ``present`` (the machine's packages: name -> version, None where unknown) meets. A
    present package of unknown version meets a requirement only if it names no version but
    exclusions (``regex!=2019.12.17``: an old release shut out). The
    requirements of carried packages are followed (read from this interpreter's installed
    metadata, which must be theirs); those of present packages are the machine's own."""
    problems, seen = [], set()
    todo = [canonicalize_name(root) for root in roots]
    for root in todo:
        if root not in carried and root not in present:
            problems.append(f"{root}: neither carried nor present")
    while todo:
        name = todo.pop()
        if name in seen or name not in carried:
            continue
        seen.add(name)
        try:
            needs = requirements(name, environment)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed here, so its requirements cannot be read")
            continue
        for requirement in needs:
            needed = canonicalize_name(requirement.name)
            spec = requirement.specifier
            if needed in carried:
                if not spec.contains(carried[needed], prereleases=True):
                    problems.append(f"{name} needs {requirement}: the wheel is {carried[needed]}")
                todo.append(needed)
            elif needed in present:
                version = present[needed]
                bounded = any(one.operator != "!=" for one in spec)  # != only shuts out old releases
                if version is None and bounded or version and not spec.contains(version, prereleases=True):
                    problems.append(f"{name} needs {requirement}: the machine has {version or 'an unknown version'}")
            else:
                problems.append(f"{name} needs {requirement}: neither carried nor on the machine")
    return problems


def travel_bytes(dest: Path) -> int:
    """Bytes of the working tree that a device call sends (git's tracked and untracked but
    not ignored files) plus the wheels in ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    tree = sum((ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file())
    return tree + sum(path.stat().st_size for path in dest.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    opts = parser.parse_args(argv)
    lock = pins()
    missing = [name for name in WHEELS if canonicalize_name(name) not in lock]
    if missing:
        print(f"not in constraints.txt: {', '.join(missing)}", file=sys.stderr)
        return 1
    wanted = {canonicalize_name(name): lock[canonicalize_name(name)] for name in WHEELS}
    problems = unmet(ROOTS, wanted, device_packages(), DEVICE_ENVIRONMENT)
    if problems:  # read from this environment's metadata: install the project with the lock first
        print("the wheel list does not cover the machine:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    opts.dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(opts.dest.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        if wanted.get(name) != str(version):
            print(f"removing {path.name}: not on the list")
            path.unlink()
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(opts.dest),
                    *(f"{name}=={version}" for name, version in wanted.items())], check=True)
    wheels = sorted(opts.dest.glob("*.whl"))
    for path in wheels:
        print(f"{path.stat().st_size / 1024**2:8.2f} MiB  {path.name}")
    total = travel_bytes(opts.dest)
    print(f"{len(wheels)} wheels; with the working tree {total / 1024**2:.1f} MiB of the "
          f"{TRAVEL_LIMIT / 1024**2:.0f} MiB the machine takes")
    return 0 if total <= TRAVEL_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
