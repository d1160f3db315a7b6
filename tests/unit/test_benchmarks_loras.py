"""benchmarks/loras.py runs end to end in its smoke modes (tiny models, and the simulated
accelerator) and writes its tables.

A subprocess, as the benchmark is run: it sets torch's thread count for its whole process.
It inherits this session's private tiny-model cache (tests/conftest.py).
"""

import subprocess
import sys

from tests.conftest import REPO_ROOT, run_benchmark_smoke


def ratio_lines(table: str) -> list[str]:
    return [line for line in table.splitlines() if "mixed / grouped:" in line]


def test_lora_benchmark_smoke_writes_its_table(tmp_path):
    done = run_benchmark_smoke("loras", tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = list(tmp_path.glob("loras-*-smoke.md"))  # loras-cpu-smoke.md, or the GPU's name
    assert len(reports) == 1, sorted(p.name for p in tmp_path.iterdir())
    table = reports[0].read_text()
    assert table.strip() in done.stdout  # printed too
    assert "smoke run" in table and "torch threads 1" in table
    assert "Command: `python3 -m benchmarks.loras --smoke --out" in table
    assert "2 batches of 4 images" in table and "64x64, 1 step" in table
    rows = [line for line in table.splitlines() if line.startswith("| (")]
    assert [row[:5] for row in rows] == ["| (a)", "| (b)", "| (c)", "| (s)", "| (d)", "| (a'"]
    assert rows[0].split(" | ")[6] == "1.00x"  # (a) is the reference of the ratios
    # (s) copies into its one slot at every batch, (d) evicts, reloads and copies; the
    # others load and copy nothing after the warm-up.
    assert [row.split(" | ")[3] for row in rows] == ["0 / 0 / 0", "0 / 0 / 0", "0 / 0 / 0", "0 / 0 / 2",
                                                     "2 / 2 / 2", "0 / 0 / 0"]
    # Grouped runs took two pipeline calls, mixed ones one (the script checks each round).
    assert "| 4 A + 4 B, one slot: grouped | 2 |" in table
    assert "| 4 A + 4 B, two slots: mixed | 1 |" in table
    assert "| 3 A + 3 B + 2 none, two slots: mixed | 1 |" in table
    assert [line.split(",")[0] for line in ratio_lines(table)] == ["- request mode", "- step mode"]


def test_lora_benchmark_sim_smoke_charges_the_simulated_device(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.loras", "--sim", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    table = (tmp_path / "loras-sim-h100-smoke.md").read_text()
    assert "smoke run" in table and "adapters of rank 16" in table
    assert "| 4 A + 4 B, one slot: grouped | 2 |" in table  # two pipeline calls
    # Step mode, 2 steps: grouped runs A's jobs and B's jobs in UNet calls of their own.
    assert "| 4 A + 4 B, one slot: grouped | 4 |" in table
    assert len(ratio_lines(table)) == 2
    # The simulated device's seconds are the cost model's: mixed (one call) charges less
    # than grouped (two calls) here.
    request = ratio_lines(table)[0]
    assert float(request.split("**")[1].rstrip("x")) > 1.0, request
