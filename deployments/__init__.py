"""The model deployments, in rooms that show their layers.

- The package root is the contract and the registry, importable without torch:
  ``contract.py`` (typed jobs and results between the ingress and a replica), ``families.py``
  (one entry per model family), ``sources.py`` (where weights come from), ``host.py`` (what the
  app builder binds) and ``errors.py``. The app imports only these and the image store.
- ``runtime/``: what every replica shares: the replica base, batching, the step loop, LoRA
  adapters, loading, previews, arrays, metrics.
- ``pipelines/``: one module per model family, each a replica class over its diffusers pipeline.
- ``store/``: the image store deployment (uploads and results held between calls).
- ``standins/``: tiny and simulated weights, plugged in as source kinds from outside.
"""
