"""One module per model family: a replica class over its diffusers pipeline, named in the
family registry (``deployments/families.py``) and imported only in the replica's process."""
