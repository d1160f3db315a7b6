"""serve-app check's library versions against the lock (serve_app/tools/versions.py)."""

from importlib.metadata import version

import pytest

from serve_app.tools import cli
from serve_app.tools.versions import KEY_PACKAGES, LOCK_FILE, locked_versions, version_report
from tests.conftest import REPO_ROOT, TINY_CONFIG


def test_the_checkouts_lock_is_read():
    assert LOCK_FILE == REPO_ROOT / "constraints.txt"
    pins = locked_versions()
    assert all(name in pins for name in ("torch", "diffusers", "transformers", "peft", "ray", "spandrel"))


def test_each_key_library_is_said_locked_or_not(tmp_path):
    lock = tmp_path / "constraints.txt"
    lock.write_text("# a comment\ntorch==0.0.1\nDiffusers==%s\n" % version("diffusers"))
    report = version_report(lock)
    lines = {line.split()[0]: line for line in report.lines[1:] if not line.startswith("  (")}
    assert set(KEY_PACKAGES) <= set(lines)
    assert lines["torch"].endswith("NOT the locked 0.0.1")
    assert lines["diffusers"].endswith("locked") and "NOT" not in lines["diffusers"]
    assert lines["peft"].endswith("not in the lock")
    assert report.lines[-1] == "  (install the tested set: python3 -m pip install -c constraints.txt -e .)"


def test_without_a_lock_the_versions_are_still_printed(tmp_path):
    report = version_report(tmp_path / "constraints.txt")
    assert "no constraints.txt here" in report.lines[0]
    assert report.lines[3].split()[:2] == ["transformers", version("transformers")]


def test_a_transformers_that_refuses_the_installed_peft_is_a_problem_and_check_fails(monkeypatch, capsys):
    import transformers.integrations.peft as transformers_peft

    assert version_report().problems == []
    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", "99.0")
    report = version_report()
    assert report.problems == [
        f"transformers {version('transformers')} needs peft >= 99.0; peft {version('peft')} is "
        "installed: transformers' PEFT integration refuses it, so LoRA adapters do not work"]
    assert f"  PROBLEM: {report.problems[0]}" in report.lines
    assert cli.main(["check", str(TINY_CONFIG)]) == cli.EXIT_UNUSABLE
    out = capsys.readouterr().out
    assert out.startswith("libraries (against constraints.txt):") and "PROBLEM: transformers" in out


@pytest.mark.parametrize("line", ["torch==2.14.1", "ray[serve]==2.60.0  # why"])
def test_lock_lines(tmp_path, line):
    lock = tmp_path / "c.txt"
    lock.write_text(line + "\n")
    (name, pinned), = locked_versions(lock).items()
    assert name in ("torch", "ray") and pinned in ("2.14.1", "2.60.0")


def required_distributions(name: str, extras: frozenset = frozenset(), seen=None) -> set[str]:
    """Every distribution ``name[extras]`` needs on this platform, transitively (the
    installed packages' own metadata, markers evaluated)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen = set() if seen is None else seen
    key = (canonicalize_name(name), extras)
    if key in seen:
        return set()
    seen.add(key)
    found = {canonicalize_name(name)}
    try:
        requirements = requires(name) or []
    except PackageNotFoundError:
        return found
    for text in requirements:
        requirement = Requirement(text)
        wanted = [{"extra": extra} for extra in extras] or [{"extra": ""}]
        if requirement.marker is None or any(requirement.marker.evaluate(env) for env in wanted):
            found |= required_distributions(requirement.name, frozenset(requirement.extras), seen)
    return found


def test_the_lock_pins_every_distribution_the_project_and_its_tests_need():
    """A fresh install with -c constraints.txt takes no version the tests did not run
    against: each distribution serve-app[test] needs, transitively, is pinned."""
    from packaging.utils import canonicalize_name

    pins = {canonicalize_name(name) for name in locked_versions()}
    needed = required_distributions("serve-app", frozenset({"test"})) - {"serve-app"}
    assert len(needed) > 50
    assert sorted(needed - pins) == []
