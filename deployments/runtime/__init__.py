"""What every model replica shares: the replica base (``replica.py``), the request batcher
(``batching.py``), the step loop (``steploop.py``), LoRA adapters (``loras.py``), loading a
pipeline (``loading.py``), previews, arrays and metrics. Imports the package root, never a
pipeline family or a stand-in."""
