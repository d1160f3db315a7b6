"""Stand-ins for real weights, plugged in as source kinds (deployments/sources.py).

- ``tiny:`` (``tiny.py``): tiny seeded models of the real classes, built from the real
  models' configuration files, loaded through the same ``from_pretrained`` path.
- ``sim:`` (``sim.py``): a simulated accelerator for benchmarks, sleeping for an H100's time.

They register through the ``serve_app.source_kinds`` entry points in ``pyproject.toml``; the
replica code never names them.
"""
