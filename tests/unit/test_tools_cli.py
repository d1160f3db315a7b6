"""Every ``serve-app`` command keeps cli.py's promise: 0 fine, 1 an unusable source or an
over-committed GPU, 2 an invalid config (a ConfigError, a file that is missing or is not
YAML), each 1 and 2 with one line on stderr and never a traceback."""

from __future__ import annotations

import pytest
import yaml

from serve_app.tools.cli import main, one_line
from serve_app.tools.launch import load_serve_config
from tests.conftest import REPO_ROOT, TINY_CONFIG

LOCAL_GPU_CONFIG = REPO_ROOT / "configs" / "local-gpu.yaml"


def _invalid(tmp_path):
    config = load_serve_config(TINY_CONFIG)
    config["applications"][0]["args"]["models"][0]["famly"] = "sd21"
    path = tmp_path / "invalid.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, "models.0.famly: unknown key"


def _missing(tmp_path):
    return tmp_path / "nowhere.yaml", "No such file or directory"


def _not_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("applications: [{name: images,\n  args: {models: [\n")
    return path, "is not YAML"


def _not_a_serve_config(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- just\n- a list\n")
    return path, "no 'applications'"


def _not_a_mapping(tmp_path):
    path = tmp_path / "apps.yaml"
    path.write_text("applications: [images]\n")
    return path, "applications[0] is not a mapping"


COMMANDS = {
    "check": lambda config, tmp_path: ["check", config],
    "fetch": lambda config, tmp_path: ["fetch", config, "--to", tmp_path / "fetched"],
    "capacity": lambda config, tmp_path: ["capacity", config],
    "tiny-config": lambda config, tmp_path: ["tiny-config", config],
}
CONFIGS = {"invalid": _invalid, "missing": _missing, "not-yaml": _not_yaml,
           "not-a-serve-config": _not_a_serve_config, "not-a-mapping": _not_a_mapping}


def _run(capsys, argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("bad", CONFIGS)
@pytest.mark.parametrize("command", COMMANDS)
def test_an_unusable_config_exits_2_with_one_line(capsys, tmp_path, command, bad):
    config, said = CONFIGS[bad](tmp_path)
    code, out, err = _run(capsys, COMMANDS[command](config, tmp_path))
    assert code == 2, out + err
    line = _one_line(err)
    assert line.startswith(f"serve-app {command}: ") and said in line, line
    assert not (tmp_path / "fetched").exists()  # fetch wrote nothing


def test_capacity_takes_a_memory_size_only(capsys):
    code, _, err = _run(capsys, ["capacity", LOCAL_GPU_CONFIG, "--gpu-memory", "lots"])
    assert code == 2 and "--gpu-memory" in _one_line(err)


def test_the_capacity_module_exits_as_the_command_does(capsys, tmp_path):
    from serve_app.tools import capacity

    config, said = _missing(tmp_path)
    assert capacity.main([str(config)]) == 2
    assert said in _one_line(capsys.readouterr().err)


def test_an_unusable_source_exits_1_with_one_line(capsys, tmp_path):
    config = load_serve_config(TINY_CONFIG)
    config["applications"][0]["args"]["models"][0]["source"] = str(tmp_path / "nowhere")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    code, out, err = _run(capsys, ["check", path])
    assert code == 1 and "no such folder" in out
    assert _one_line(err) == "serve-app check: 1 sources with problems"
    code, out, err = _run(capsys, ["fetch", path, "--to", tmp_path / "fetched"])
    assert code == 1 and "1 sources could not be fetched" in _one_line(err)


def test_an_over_committed_gpu_exits_1_with_one_line(capsys):
    code, out, err = _run(capsys, ["capacity", LOCAL_GPU_CONFIG, "--gpu-memory", "8GiB"])
    assert code == 1 and "OVER-COMMITTED" in out
    assert "over-commits its GPU" in _one_line(err)


def test_the_capacity_script_on_an_invalid_config_exits_2(tmp_path):
    # The reported bug: `serve-app capacity` raised instead of exiting 2 (a process of its own).
    import subprocess
    import sys

    config, said = _invalid(tmp_path)
    result = subprocess.run([sys.executable, "-m", "serve_app.tools.capacity", str(config)],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 2, result.stdout + result.stderr
    assert said in _one_line(result.stderr)


def test_one_line_joins_a_config_errors_lines():
    assert one_line("invalid serve_app config:\n  a: x\n  b: y\n") == "invalid serve_app config: a: x; b: y"
    assert one_line("first\nsecond") == "first; second"
