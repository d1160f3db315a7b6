"""benchmarks/soak.py runs end to end in its smoke mode (the tiny app in its own Ray instance,
in a subprocess, as the benchmark is run: 40 s of mixed load, a replica killed every 15 s) and
writes its report."""

import re

import pytest

from tests.conftest import run_benchmark_smoke

pytestmark = pytest.mark.integration


def test_soak_benchmark_smoke_kills_replicas_under_load_and_reports_every_request(tmp_path):
    done = run_benchmark_smoke("soak", tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    report = (tmp_path / "soak-smoke.md").read_text()
    assert report.strip() in done.stdout
    assert "Command: `python3 -m benchmarks.soak --smoke --out" in report and "smoke run" in report
    (row,) = [line for line in report.splitlines() if re.match(r"\| \d+ \| \d+ \| \d+ \| [\d.]+% \|", line)]
    total, ok, failed, _, kills, _, runs_again = (cell.strip() for cell in row.strip("|").split("|"))
    assert int(total) > 0 and int(ok) + int(failed) == int(total)
    assert int(kills) == 2  # at 15 s and 30 s
    assert runs_again.isdigit()  # read from the ingress's log
    kill_rows = [line for line in report.split("Kills")[1].splitlines() if re.match(r"\| \d+ s \|", line)]
    assert len(kill_rows) == 2 and all("RUNNING" in row or "STARTING" in row for row in kill_rows)
    # A lost replica is never a fault of the server's code nor a hang: no 500, no client error.
    statuses = report.split("By status:")[1].split("By kind:")[0]
    assert "| 500 |" not in statuses and "client error" not in statuses
