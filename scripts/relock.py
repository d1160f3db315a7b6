#!/usr/bin/env python3
"""Re-solve the dependency lock (constraints.txt) in a fresh environment; write it only
when the tests pass there.

    python3 scripts/relock.py            # re-solve, run every test, write constraints.txt
    python3 scripts/relock.py -- -x tests/unit   # pytest arguments after "--"
    python3 scripts/relock.py --check    # re-solve and test, print the changes, write nothing

Steps: copy this checkout's files (tracked, and untracked ones git does not ignore) into a
temporary folder; make a new virtual environment there; install ``-e ".[test]"`` with pip's
resolver and *no* lock (today's newest releases within pyproject.toml's bounds); run the
tests with that environment; if they pass, write its ``pip freeze`` (the project itself left
out) to constraints.txt with a header saying when and where it was made. Nothing is kept of
the temporary folder unless ``--keep``.

Why pip and ``pip freeze``, not pip-tools or uv: the lock must be the set the tests ran
against, and the freeze of the environment that passed them is exactly that; pip is the
tool the README's install commands use, so nothing more is installed to make the lock.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"


def checkout_files(root: Path) -> list[str]:
    """The checkout's files as a fresh clone plus uncommitted work has them."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, check=True, capture_output=True).stdout
    return sorted({name for name in out.decode().split("\0") if name and (root / name).is_file()})


def copy_checkout(root: Path, target: Path) -> None:
    for name in checkout_files(root):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, destination)


def freeze(python: Path) -> list[str]:
    """The environment's pins; ``--all`` so that setuptools (which torch and grpcio-tools
    require, and plain ``pip freeze`` leaves out) is pinned too; pip itself is not."""
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--all", "--exclude-editable"],
                         check=True, capture_output=True, text=True).stdout
    return sorted((line for line in out.splitlines()
                   if line and not line.startswith("#") and not line.lower().startswith("pip==")),
                  key=str.lower)


def lock_text(pins: list[str], tested: str) -> str:
    header = [
        "# The tested dependency set: `pip install -c constraints.txt ...` (README) installs",
        "# exactly these versions. Written by scripts/relock.py after the tests passed in a fresh",
        "# virtual environment; do not edit by hand, re-run the script (README, 'Dependencies').",
        f"# Made {datetime.date.today().isoformat()} on Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}; tests: {tested}",
    ]
    return "\n".join(header + pins) + "\n"


def pins_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="test the new set, write nothing")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--python", default=sys.executable, help="the Python to make the venv from")
    parser.add_argument("pytest_args", nargs="*", help="after '--': arguments for pytest")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="relock-"))
    source, environment = work / "src", work / "venv"
    try:
        copy_checkout(ROOT, source)
        started = time.monotonic()
        subprocess.run([args.python, "-m", "venv", str(environment)], check=True)
        python = environment / "bin" / "python"
        print(f"relock: installing -e .[test] without the lock into {environment}", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", ".[test]"],
                       cwd=source, check=True)
        installed = time.monotonic() - started
        print(f"relock: installed in {installed:.0f} s; running pytest {' '.join(args.pytest_args)}",
              flush=True)
        tests = subprocess.run([str(python), "-m", "pytest", *args.pytest_args], cwd=source)
        if tests.returncode != 0:
            print(f"relock: the tests failed (pytest exit {tests.returncode}): "
                  f"{LOCK.name} is left as it was", file=sys.stderr)
            return 1
        pins = freeze(python)
        new = lock_text(pins, " ".join(["pytest", *args.pytest_args]) + " passed")
        old = LOCK.read_text() if LOCK.exists() else ""
        changes = [line for line in difflib.unified_diff(pins_of(old), pins, "locked", "new",
                                                         lineterm="", n=0)
                   if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        print("\n".join(changes) if changes else "relock: no version changed")
        if args.check:
            print(f"relock: --check: {LOCK.name} not written")
        else:
            LOCK.write_text(new)
            print(f"relock: wrote {LOCK} ({len(pins)} pins, {time.monotonic() - started:.0f} s in all)")
        return 0
    finally:
        if args.keep:
            print(f"relock: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
