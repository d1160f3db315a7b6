"""Stability AI's generation protocol (package ``gooseai``), the part this server answers:
``generation.proto`` and the modules grpcio-tools generates from it
(``python3 scripts/generate_grpc.py``; do not edit them by hand)."""
