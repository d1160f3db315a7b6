"""benchmarks/gpu.py runs end to end in its smoke mode and writes its tables; benchmarks/
gpu_run.py plans a run within a GPU machine's 8 minutes, most valuable figures first, streams
each figure as it comes and stops a compiled variant at its cap; scripts/gpu_wheels.py's
wheels and the GPU machine's packages meet every requirement.

The smoke runs are subprocesses, as the benchmarks are run: they set torch's thread count
for their whole process. They inherit this session's private tiny-model cache
(tests/conftest.py).
"""

import argparse
import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, benchmark_module, run_benchmark_smoke

# Every served model's workload of the GPU targets (sdxl-20: the batched goal's 20 steps).
CASES = ["sdxl", "sdxl-20", "sdxl+refiner", "sd21", "x4-upscaler", "x2-latent-upscaler", "esrgan"]
FAMILIES = ["sdxl", "sdxl-refiner", "sd21", "sd-x4-upscaler", "sd-x2-latent-upscaler", "esrgan"]


def section(table: str, title: str) -> list[list[str]]:
    """The rows (cells) of the markdown table under ``## title``."""
    text = table.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]  # no header


def test_gpu_benchmark_smoke_writes_its_tables(tmp_path):
    done = run_benchmark_smoke("gpu", tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = list(tmp_path.glob("gpu-*-smoke.md"))  # gpu-cpu-smoke.md
    assert len(reports) == 1, sorted(p.name for p in tmp_path.iterdir())
    table = reports[0].read_text()
    assert table.strip() in done.stdout  # printed too
    assert "smoke run" in table
    assert "Command: `python3 -m benchmarks.gpu --smoke --out" in table
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


# ---------------------------------------------------------------------------------------
# benchmarks/gpu_run.py


@pytest.fixture(scope="module")
def gpu_run():
    return benchmark_module("gpu_run")


@pytest.fixture(scope="module")
def plan(gpu_run):
    return gpu_run.make_plan(argparse.Namespace(repeats=3, budget=gpu_run.BUDGET_S))


def test_plan_prints_a_run_within_eight_minutes():
    """``--plan`` prints every step's arithmetic and a total within the 8-minute budget,
    with minutes left for the compiled variants."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_run", "--plan"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    last = done.stdout.strip().splitlines()[-1]
    eager, compiled, total, budget = (float(x) for x in re.findall(r"(\d+(?:\.\d+)?) s", last)[:4])
    assert budget == 480 and total <= budget and eager + compiled == pytest.approx(total, abs=1)
    assert eager <= 300, last  # the eager figures leave minutes to compile in
    assert "OVER BUDGET" not in done.stdout


def test_plan_runs_in_the_order_of_value(plan):
    """Memory and dtypes of every model first, then the headline and SDXL's batched rate,
    the other models eager, LoRA's mixed and grouped batches, the compiled variants last and
    capped (the compiled LoRA replica with what is left)."""
    phases = [step.phase for step in plan]
    assert phases == sorted(phases) and set(phases) == {0, 1, 2, 3, 4, 5}
    memory = [step.title.split(":")[0] for step in plan if step.phase == 1]
    assert memory == ["sdxl", "sdxl-refiner", "sd21", "sd-x4-upscaler", "sd-x2-latent-upscaler", "esrgan"]
    headline = next(step for step in plan if step.phase == 2)
    assert "30 steps, batch 1" in headline.title and "headline" in headline.title
    assert any("20 steps, batch 4" in step.title for step in plan if step.phase == 2)
    phase3 = [step.title for step in plan if step.phase == 3]
    assert [t.split(",")[0] for t in phase3] == ["SD 2.1 768x768", "SDXL -> refiner: the refiner stage from 0.8",
                                                 "x4 upscaler from 512x768", "x2 latent upscaler from 1024x1024",
                                                 "ESRGAN x2 at 1024x1024"]
    loras = [step.title for step in plan if step.phase == 4]
    assert [t.split(":")[0] for t in loras] == ["LoRA, SD 2.1 512x512, 20 steps", "LoRA, SDXL 1024x1024, 10 steps"]
    assert all("mixed against grouped" in t for t in loras) and "12 adapter switches, eager" in loras[0]
    compiled = [step.title for step in plan if step.phase == 5]
    assert compiled[0].startswith("SDXL compiled, torch.compile mode default")
    assert compiled[-1].startswith("LoRA, SD 2.1 512x512, 20 steps, compiled") and len(compiled) == 2
    assert all(step.capped for step in plan if step.phase == 5)
    assert not any(step.capped for step in plan if step.phase < 5)


def test_without_loras_the_replicas_compile_options_take_their_time(gpu_run, plan):
    """--no-loras: no phase 4, and the SDXL variant of the replicas' own compile options
    comes back with the rest of the budget."""
    bare = gpu_run.make_plan(argparse.Namespace(repeats=3, budget=gpu_run.BUDGET_S, no_loras=True))
    assert {step.phase for step in bare} == {0, 1, 2, 3, 5}
    assert [s.title for s in bare if s.phase < 4] == [s.title for s in plan if s.phase < 4]
    assert [s.title.split(":")[0] for s in bare if s.phase == 5] == [v.label for v in gpu_run.VARIANTS]
    assert sum(s.planned_s for s in bare) <= gpu_run.BUDGET_S


def test_plan_prices_the_headline_at_the_published_h100_figure(gpu_run, plan):
    headline = next(step for step in plan if step.phase == 2)
    per_call = gpu_run.h100_call_s(gpu_run.case_of("sdxl"), 1, 30)
    assert per_call == pytest.approx(2.496)  # deployments/standins/sim.py: [B], 2496 ms
    assert f"3 x {per_call:.2f} s" in str(headline.cost)


def test_phase1_sizes_are_the_largest_configured(gpu_run):
    """Each model's peak is measured at the largest size configs/cluster.yaml lets it take."""
    models = {m["family"]: m for m in yaml.safe_load((REPO_ROOT / "configs" / "cluster.yaml").read_text())
              ["applications"][0]["args"]["models"]}
    for family, model in models.items():
        width, height = gpu_run.phase1_case(family).size
        limits = model["limits"]
        largest = limits.get("max_input_pixels") or max(
            [limits.get("max_pixels") or 0] + [int(w) * int(h) for w, h in (s.split("x") for s in limits["sizes"])])
        assert width * height == largest, family


def test_figures_are_written_one_by_one(gpu_run, tmp_path):
    path = tmp_path / "out" / "figures.jsonl"
    figures = gpu_run.Figures(path, time.time())
    figures.write(1, "peak_memory", "first", model="sdxl", measured_gib=9.5)
    with open(path) as other:  # as a reader that finds the run killed after the first figure
        (line,) = other.read().splitlines()
    assert json.loads(line)["measured_gib"] == 9.5 and json.loads(line)["text"] == "first"
    figures.write(2, "latency", "second", median_s=2.5)
    assert [json.loads(x)["figure"] for x in path.read_text().splitlines()] == ["peak_memory", "latency"]


def test_a_variant_over_its_cap_is_reported_without_waiting(gpu_run, tmp_path):
    figures = gpu_run.Figures(tmp_path / "figures.jsonl", time.time())
    start = time.perf_counter()
    sleeper = [sys.executable, "-c", "import subprocess, sys, time; "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"]
    assert gpu_run.run_capped(figures, "a slow compile", sleeper, cap_s=1.0) is False
    assert time.perf_counter() - start < 10
    (record,) = [json.loads(x) for x in figures.path.read_text().splitlines()]
    assert record["status"] == "over cap" and record["cap_s"] == 1.0 and record["phase"] == 5
    assert "over its cap" in record["text"]
    quick = [sys.executable, "-c", "pass"]
    assert gpu_run.run_capped(figures, "a quick one", quick, cap_s=30.0) is True


def device_like_python(folder: Path) -> Path:
    """The Python of a virtual environment in ``folder`` that holds only what the GPU machine
    would: this environment's copies of the machine's packages (scripts/gpu_device_packages.txt)
    and of the carried wheels, with everything they require; no Ray, no FastAPI."""
    from scripts.gpu_wheels import WHEELS, canonicalize_name, device_packages, requirements

    dists = {}
    for dist in importlib.metadata.distributions():
        dists.setdefault(canonicalize_name(dist.metadata["Name"]), dist)
    allowed, todo = set(), [*device_packages(), *map(canonicalize_name, WHEELS)]
    while todo:
        name = todo.pop()
        if name not in allowed and name in dists:
            allowed.add(name)
            todo += [canonicalize_name(r.name) for r in requirements(name)]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    (site,) = folder.glob("lib/python*/site-packages")
    for name in allowed:
        for top in {f.parts[0] for f in dists[name].files or [] if f.parts[0] not in ("..", "__pycache__")}:
            if not (site / top).exists():
                (site / top).symlink_to(dists[name].locate_file(top))
    return folder / "bin" / "python"


def test_gpu_run_smoke_streams_every_figure_in_order(tmp_path):
    """The whole run on the tiny models on CPU, with only what the GPU machine has and the
    wheels carry (no Ray: the deployments' stub stands in): every step done, in the plan's
    order, each figure a line of its own; the compiled variants in their own processes (on
    the CPU they load without compiling: the path is what is checked); the LoRA figures on
    random adapters built for the tiny UNets, mixed images equal to grouped ones."""
    python = device_like_python(tmp_path / "venv")
    for module, there in (("ray", False), ("fastapi", False), ("diffusers", True), ("pydantic", True)):
        found = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0
        assert found is there, module
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python), "-m", "benchmarks.gpu_run", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("gpu-run-*-smoke.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["figure"] for r in records[:3]] == ["machine", "requirements", "plan"]
    assert records[1]["unmet"] == []
    assert records[-1]["figure"] == "end" and records[-1]["failures"] == 0
    phases = [r["phase"] for r in records[3:-1]]
    assert phases == sorted(phases), phases
    steps = [r for r in records if r["figure"] == "step"]
    assert len(steps) == 18 and all(r["status"] == "done" for r in steps), steps
    assert [r["step"] for r in steps] == [r["step"] for r in records[2]["steps"] if r["phase"]]

    memory = {r["model"]: r for r in records if r["figure"] == "peak_memory"}
    assert list(memory) == FAMILIES
    assert memory["sd21"]["batch"] == 8 and memory["sdxl"]["batch"] == 4 and memory["esrgan"]["batch"] == 2
    assert all(r["estimate_gib"] > 0 and r["measured_gib"] is None for r in memory.values())
    dtypes = {r["model"]: r for r in records if r["figure"] == "dtypes"}
    assert list(dtypes) == FAMILIES and all(r["other_dtypes"] == {} for r in dtypes.values())

    latency = [r for r in records if r["figure"] == "latency"]
    assert latency[0]["headline"] is True and latency[0]["case"] == "sdxl" and latency[0]["batch"] == 1
    assert latency[1]["case"] == "sdxl-20" and latency[1]["batch"] == 4
    eager = [r["case"] for r in latency if r["phase"] == 3]
    assert eager == ["sd21", "sdxl+refiner", "sdxl+refiner", "x4-upscaler", "x2-latent-upscaler", "esrgan"]
    chain = [r for r in latency if r["case"] == "sdxl+refiner" and "stages_s" in r]
    assert len(chain) == 1 and sum(chain[0]["stages_s"]) == pytest.approx(chain[0]["median_s"], abs=1e-3)
    compiled = [r for r in records if r["phase"] == 5 and r["figure"] in ("compile", "latency")]
    assert [(r["figure"], r.get("status")) for r in compiled] == [("compile", "compiled"), ("latency", None),
                                                                  ("compile", "compiled")]
    assert all(len(r["seconds"]) == 3 and r["median_s"] > 0 for r in latency if "seconds" in r)

    setup = {r["model"]: r for r in records if r["figure"] == "lora_setup"}
    assert list(setup) == ["sd21", "sdxl"]
    assert all(r["slot_rank"] == r["rank"] == 16 and r["layers"] > 0 and r["lora_mib"] > 0 for r in setup.values())
    batches = [(r["model"], r["kind"], r["calls"]) for r in records if r["figure"] == "lora_batch"]
    assert batches == [("sd21", "mixed", [4]), ("sd21", "grouped", [2, 2]), ("sd21", "no adapters", [4]),
                       ("sdxl", "mixed", [4]), ("sdxl", "grouped", [2, 2])]
    versus = [r for r in records if r["figure"] == "lora_mixed_vs_grouped"]
    assert [r["model"] for r in versus] == ["sd21", "sdxl"]
    assert all(r["max_diff_255"] <= 2 and r["grouped_over_mixed"] > 0 for r in versus), versus
    switches = [r for r in records if r["figure"] == "lora_switches"]
    assert [(r["phase"], r["mode"].split(",")[0]) for r in switches] == [(4, "eager"), (5, "compile asked")]
    assert all(r["recompiles"] == 0 and r["swaps"] > 0 and len(r["seconds"]) == 5 for r in switches), switches
    assert switches[1]["eager_median_s"] == switches[0]["median_s"]
    assert len([r for r in records if r["figure"] == "lora_switch"]) == 10


# ---------------------------------------------------------------------------------------
# scripts/gpu_wheels.py


@pytest.fixture(scope="module")
def wheels():
    return importlib.import_module("scripts.gpu_wheels")


def test_the_wheels_and_the_machine_meet_every_requirement(wheels):
    """Every requirement of diffusers, spandrel and pydantic (the installed distributions'
    metadata, at the lock's versions), transitively, is on the machine's package list or in
    the wheel list, for Python 3.12 on Linux."""
    lock = wheels.pins()
    carried = {name: lock[name] for name in map(wheels.canonicalize_name, wheels.WHEELS)}
    for name, version in carried.items():
        assert importlib.metadata.version(name) == version, f"{name}: install the lock first"
    device = wheels.device_packages()
    assert {"torch", "transformers", "accelerate", "peft", "pyyaml"} <= set(device)
    assert not {"diffusers", "spandrel", "ray"} & set(device)
    assert wheels.unmet(wheels.ROOTS, carried, device, wheels.DEVICE_ENVIRONMENT) == []
    # Carried though there: no version of theirs is known, and pydantic and importlib-metadata name one.
    assert set(carried) & set(device) == {"typing-extensions", "zipp"}


def test_a_wheel_left_off_the_list_is_caught(wheels):
    lock = wheels.pins()
    carried = {name: lock[name] for name in map(wheels.canonicalize_name, wheels.WHEELS)}
    device = wheels.device_packages()
    short = {k: v for k, v in carried.items() if k != "pydantic-core"}
    assert any("pydantic-core" in p for p in wheels.unmet(wheels.ROOTS, short, device, wheels.DEVICE_ENVIRONMENT))
    older = {**device, "huggingface-hub": "1.0.0"}  # diffusers needs >=1.32
    assert any("huggingface-hub" in p for p in wheels.unmet(wheels.ROOTS, carried, older, wheels.DEVICE_ENVIRONMENT))
    unknown = {k: v for k, v in carried.items() if k != "typing-extensions"}  # pydantic needs >=4.16
    assert any("typing-extensions" in p for p in wheels.unmet(wheels.ROOTS, unknown, device, wheels.DEVICE_ENVIRONMENT))
