"""benchmarks/bench.py's report (the run itself takes 20 minutes and stays out of CI): the
ratios and cold-start rows it writes come from the figures it is given."""

import pytest

from tests.conftest import benchmark_module


@pytest.fixture(scope="module")
def bench():
    return benchmark_module("bench")


def figures():
    bare = {1: {"p50_s": 0.40, "images_per_s": 2.5}, 2: {"p50_s": 0.82, "images_per_s": 2.4}}
    row = {"images_per_s": 2.0, "p50_s": 0.5, "p99_s": 0.6}
    served = {
        "c1": {"bare": 0.340, "served_png": 0.380, "served_jpeg": 0.385,
               "served_png_checked": 0.420, "floor_png": 0.390},
        "batched": {1: row, 4: row, 16: {**row, "images_per_s": 2.25}},
        "unbatched": {1: row, 4: row, 16: row},
        "c16_batched": {"bare": 2.5, "served": 2.0},
        "c16_unbatched": {"bare": 2.4, "served": 2.28},
    }
    cold = ({"models": 12.0, "generation": 21.0, "health": 21.1},
            {"this app": [{"models": 13.0, "generation": 20.0, "health": 20.1},
                          {"models": 14.0, "generation": 22.0, "health": 22.1},
                          {"models": 12.5}],
             "Serve floor, tiny SD 2.1": [{"generation": 16.0}, {"generation": 17.0}, {"generation": 15.0}],
             "Serve hello world": [{"generation": 9.0}, {"generation": 10.0}, {"generation": 11.0}]})
    return bare, served, cold


def test_report_states_the_side_by_side_ratios_and_cold_start_floors(bench, tmp_path):
    bare, served, cold = figures()
    report = bench.write_report(bare, served, 4, tmp_path, cold, png_ms=1.5).read_text()
    assert "2.28 / 2.40 = **0.95** unbatched" in report
    assert "2.00 / 2.50 = **0.80** batched" in report
    assert "Batch 1 is the bare pipeline's best" in report
    assert "0.90 batched against bare batch 1" in report  # 2.25 / 2.5, the separate runs
    assert "an excess of +38 ms against 15" in report  # 380 - 340 - 1.5
    assert "| `configs/tiny.yaml` (this app) | built from nothing | 12.0 s | 21.0 s | 21.1 s |" in report
    # Medians of the runs that answered; a run that never answered is counted, not hidden.
    assert "| 21.0 s (1 of 3 not within 300 s) |" in report
    assert "| `floor_apps:tiny_sd21` (Serve floor) | built | | 16.0 s (15.0-17.0) | |" in report
    assert "this app minus the tiny SD 2.1 floor: +5.0 s" in report
    assert "hello world alone (Ray and Serve starting): 10.0 s" in report
    assert (tmp_path / "tiny-cpu.png").stat().st_size > 0
