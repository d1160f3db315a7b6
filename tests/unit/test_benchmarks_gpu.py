"""benchmarks/gpu.py runs end to end in its smoke mode and writes its tables.

A subprocess, as the benchmark is run: it sets torch's thread count for its whole process.
It inherits this session's private tiny-model cache (tests/conftest.py).
"""

from tests.conftest import run_benchmark_smoke

# Every served model's workload of issue 16 (sdxl-20: the batched goal's 20 steps).
CASES = ["sdxl", "sdxl-20", "sdxl+refiner", "sd21", "x4-upscaler", "x2-latent-upscaler", "esrgan"]
FAMILIES = ["sdxl", "sdxl-refiner", "sd21", "sd-x4-upscaler", "sd-x2-latent-upscaler", "esrgan"]


def section(table: str, title: str) -> list[list[str]]:
    """The rows (cells) of the markdown table under ``## title``."""
    text = table.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]  # no header


def test_gpu_benchmark_smoke_writes_its_tables(tmp_path):
    done = run_benchmark_smoke("gpu.py", tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = list(tmp_path.glob("gpu-*-smoke.md"))  # gpu-cpu-smoke.md
    assert len(reports) == 1, sorted(p.name for p in tmp_path.iterdir())
    table = reports[0].read_text()
    assert table.strip() in done.stdout  # printed too
    assert "smoke run" in table
    assert "Command: `python3 benchmarks/gpu.py --smoke --out" in table
    assert "torch " in table and "diffusers " in table  # the versions
    assert "torch.compile: skipped (CPU" in table

    dtypes = section(table, "Module dtypes after construction")
    assert {row[0] for row in dtypes} == set(FAMILIES)
    assert all(row[3] == row[4] for row in dtypes), dtypes  # every module in the replica's dtype
    assert any(row[2] == "pipe.unet" for row in dtypes)

    memory = section(table, "Peak GPU memory at the largest batch")
    assert {row[0] for row in memory} == set(FAMILIES)
    for row in memory:
        assert row[5] == "n/a (CPU)", row  # measured peak
        assert float(row[6]) > 0, row  # capacity's estimate of the full-size model

    timings = section(table, "Latency and throughput")
    for case in CASES:
        rows = [row for row in timings if row[0] == case]
        assert [row[3] for row in rows] == ["1", "2"], (case, rows)  # batch sizes
        assert all(float(row[5]) > 0 for row in rows), rows  # images/s
    chain = [row for row in timings if row[0] == "sdxl+refiner"]
    assert all(" + " in row[6] for row in chain)  # base stage + refiner stage
