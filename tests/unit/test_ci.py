"""CI runs the README's own commands, in a fresh virtual environment, with the lock."""

import re

from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
CI = (REPO_ROOT / ".ci" / "run").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [line for block in re.findall(r"```bash\n(.*?)```", section, re.S)
            for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readmes_two_commands_as_written():
    commands = quick_start_commands()
    server, tests = commands[0], commands[1]
    assert server == "python3 -m pip install -c constraints.txt -e . && serve run configs/tiny.yaml"
    assert tests == 'python3 -m pip install -c constraints.txt -e ".[test]" && python3 -m pytest'
    for command in (server, tests):
        assert command in CI, f".ci/run does not run the README's command {command!r}"


def test_ci_makes_a_fresh_virtual_environment_before_installing():
    venv = CI.index("python3 -m venv")
    activate = CI.index("/venv/bin/activate")
    assert venv < activate < CI.index("python3 -m pip install")
    assert "mktemp -d" in CI  # a new folder every run, removed at the end
    assert "--user" not in CI and "--system-site-packages" not in CI


def test_the_browser_line_is_the_one_ci_and_the_skip_name():
    from tests.integration.test_playground import BROWSER_LINE

    assert BROWSER_LINE in quick_start_commands()
    assert "apt-get install -y -q chromium chromium-driver" in CI


def test_the_lock_pins_every_direct_dependency():
    import tomllib

    from serve_app.tools.versions import locked_versions, normalize

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = locked_versions(REPO_ROOT / "constraints.txt")
    wanted = project["dependencies"] + [d for extra in project["optional-dependencies"].values()
                                        for d in extra]
    for requirement in wanted:
        name = normalize(re.match(r"[A-Za-z0-9_.-]+", requirement).group())
        if name == "serve-app":
            continue
        assert pins.get(name), f"constraints.txt pins no version of {name}"


def test_the_redis_line_is_the_one_the_jobs_tests_name():
    from tests.integration.test_jobs import REDIS_LINE

    assert REDIS_LINE in quick_start_commands()
