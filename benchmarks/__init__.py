"""The benchmarks: scripts that measure and assert nothing (the tests assert behaviour, and a
smoke test per script keeps each one working). Run each from the repository root as a module,
``python3 -m benchmarks.<name> [--smoke] [--out DIR]``:

- ``bench``: the bare tiny pipeline against the served path, and the cold start of
  ``serve run configs/tiny.yaml`` beside Ray Serve's floors (``floor_apps``);
- ``sim``: the serving layer at GPU speed, around simulated H100s;
- ``steps``: request-level against step-level batching on simulated H100s and the tiny model;
- ``steps_model``: a virtual-time model (not a measurement) of one replica's orders of work;
- ``loras``: what LoRA adapters cost per batch, grouped against mixed-adapter batches;
- ``gpu``: every served model at full size on a CUDA GPU;
- ``gpu_run``: the same on an offline GPU machine in a fixed time, most valuable figures first;
- ``fuzz``: schemathesis over the tiny profile's OpenAPI document;
- ``soak``: the tiny profile under a mixed load while replicas are killed.

``common`` is what they share. Each writes its figures, with its command and the machine, to
``benchmarks/results/``; docs/benchmarks.md explains them. Not installed with the project
(pyproject.toml's package list): the benchmarks run from a checkout.

This file imports nothing: ``gpu_run`` must put its carried wheels on the path before
anything imports torch or pydantic.
"""
