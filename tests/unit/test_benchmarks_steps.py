"""benchmarks/steps.py runs end to end in its smoke mode (simulated accelerators, both
batching modes on the same arrivals) and writes its table."""

from tests.conftest import run_benchmark_smoke


def test_steps_benchmark_smoke_compares_both_modes_on_the_same_arrivals(tmp_path):
    done = run_benchmark_smoke("steps.py", tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    table = (tmp_path / "steps-sim-smoke.md").read_text()
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| SD 2.1 768x768 | 1 | 80%")]
    assert [row[3] for row in rows] == ["request", "step"]
    jobs = {row[4] for row in rows}
    assert len(jobs) == 1 and int(jobs.pop()) > 0  # the same arrivals, all served
    for row in rows:
        rate = float(row[5].split()[0])
        rows_per_call = float(row[6])
        first_p50, first_p99 = (float(x) for x in row[7].split()[:3:2])
        assert rate > 0 and 2.0 <= rows_per_call and 0 < first_p50 <= first_p99
    assert "| SD 2.1 768x768 | 1 | " in table.split("Goals")[1]  # the goals' ratios
