"""benchmarks/sim.py runs end to end in its smoke mode (simulated accelerators, its own
Ray instance in a subprocess, as the benchmark is run) and writes its table."""

from tests.conftest import run_benchmark_smoke


def test_sim_benchmark_smoke_writes_its_table(tmp_path):
    done = run_benchmark_smoke("sim", tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    table = (tmp_path / "sim-h100-smoke.md").read_text()
    assert table.strip() in done.stdout
    assert "Command: `python3 -m benchmarks.sim --smoke --out" in table and "smoke run" in table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| SD 2.1 256x256")]
    main = [row for row in rows if len(row) == 10]
    assert [(row[1], row[2]) for row in main] == [("1", "1"), ("1", "4"), ("2", "1"), ("2", "4")]
    for row in main:
        assert row[9].endswith("(0) |"), f"failed requests: {row}"
        assert 0 < float(row[5]) <= 1.05  # of capacity: served rate under the cost model's
    # Four clients on one replica share batches; one client never waits for company.
    assert float(main[1][6]) > 1.5 and float(main[0][6]) == 1.0
    overheads = [row for row in rows if len(row) == 5]
    assert len(overheads) == 2 and all(row[4].endswith("ms |") for row in overheads)
    # Side by side with Ray Serve's own floor: both answered, both above the model time.
    (side,) = [row for row in rows if len(row) == 8]
    model_ms, ours_ms, floor_ms = (float(side[i].split()[0]) for i in (1, 3, 4))
    assert side[2] == "4" and ours_ms > model_ms and floor_ms > model_ms
    assert "| 256x256 | " in table  # the path's CPU steps
