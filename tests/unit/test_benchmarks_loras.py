"""benchmarks/loras.py runs end to end in its smoke mode and writes its table.

A subprocess, as the benchmark is run: it sets torch's thread count for its whole process.
It inherits this session's private tiny-model cache (tests/conftest.py).
"""

from tests.conftest import run_benchmark_smoke



def test_lora_benchmark_smoke_writes_its_table(tmp_path):
    done = run_benchmark_smoke("loras", tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = list(tmp_path.glob("loras-*-smoke.md"))  # loras-cpu-smoke.md, or the GPU's name
    assert len(reports) == 1, sorted(p.name for p in tmp_path.iterdir())
    table = reports[0].read_text()
    assert table.strip() in done.stdout  # printed too
    assert "smoke run" in table and "torch threads 1" in table
    assert "Command: `python3 -m benchmarks.loras --smoke --out" in table
    assert "2 batches of 4 images" in table and "64x64, 1 step" in table
    rows = [line for line in table.splitlines() if line.startswith("| (")]
    assert [row[:5] for row in rows] == ["| (a)", "| (b)", "| (c)", "| (d)", "| (a'"]
    assert rows[0].split(" | ")[5] == "1.00x"  # (a) is the reference of the ratios
    # (d) evicts and reloads at every batch; the others load nothing after the warm-up.
    assert [row.split(" | ")[2] for row in rows] == ["0 / 0", "0 / 0", "0 / 0", "2 / 2", "0 / 0"]
    assert "| half A, half B: grouped by adapter set (what the server does) | 4 + 4 |" in table
    assert "| all A: one call of 8 (the bound of a mixed-adapter batch) | 8 |" in table
    assert "Ratio one call of 8 / grouped:" in table
    assert "Mixed-adapter batches" in table and "not implemented" in table
