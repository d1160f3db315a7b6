"""benchmarks/steps.py runs end to end in its smoke mode (simulated accelerators, both
batching modes on the same arrivals) and writes its table."""

import pytest

from tests.conftest import benchmark_module, run_benchmark_smoke


def test_steps_benchmark_smoke_compares_both_modes_on_the_same_arrivals(tmp_path):
    done = run_benchmark_smoke("steps", tmp_path, timeout=300)
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


@pytest.fixture(scope="module")
def model():
    return benchmark_module("steps_model")


def test_the_model_charges_a_lone_job_the_cost_models_pipeline_call_in_every_order(model):
    from deployments.standins.sim import COSTS

    workload = model.Workload("sdxl", "sdxl", 1024, 4)
    alone = COSTS["sdxl"].call_s(1, 1024 * 1024, 30)
    done, first = model.request_level([model.Arrival(1.0, 30, 5.0, 0)], workload)
    assert done == pytest.approx([alone])
    for _, order, per_call in model.ORDERS:
        assert model.step_level([model.Arrival(1.0, 30, 5.0, 0)], workload, order, per_call * 4)[0] == pytest.approx([alone])


def test_the_models_orders_differ_as_written(model):
    workload = model.Workload("sdxl", "sdxl", 1024, 2)
    # Two old jobs mid-way, then a new one: the step loop's order gives the new job's first
    # step a call of its own right away; oldest-first makes it wait for the old ones' end.
    jobs = [model.Arrival(0.0, 20, 5.0, 0), model.Arrival(0.0, 20, 5.0, 1), model.Arrival(0.5, 20, 5.0, 2)]
    _, first_step, _ = model.step_level(jobs, workload, "step", 8)
    _, first_fifo, _ = model.step_level(jobs, workload, "oldest first", 8)
    step = model.COSTS["sdxl"].step_s(1, 1024 * 1024)
    assert max(first_step) < 0.5 + 0.1 + 2 * model.COSTS["sdxl"].step_s(2, 1024 * 1024)
    assert max(first_fifo) > 20 * step
    # The request batcher batches jobs of one key queued together.
    done, _ = model.request_level([model.Arrival(0.0, 20, 5.0, 0), model.Arrival(0.0, 20, 5.0, 1)], workload)
    assert done[0] == done[1] == pytest.approx(model.COSTS["sdxl"].call_s(2, 1024 * 1024, 20))


def test_the_model_smoke_writes_its_table(model, tmp_path):
    done = run_benchmark_smoke("steps_model", tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    table = (tmp_path / "steps-model-smoke.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| sdxl 1024x1024 | 80%")]
    assert len(rows) == 1 and rows[0].count("x (") == len(model.ORDERS) and rows[0].count(" / ") == len(model.ORDERS)
