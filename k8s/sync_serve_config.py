"""Copy configs/cluster.yaml into k8s/rayservice.yaml as its serveConfigV2.

Run after editing the cluster config: ``python3 k8s/sync_serve_config.py``. A test fails
while the two differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "cluster.yaml"
MANIFEST = ROOT / "k8s" / "rayservice.yaml"
BEGIN, END = "  serveConfigV2: |\n", "  rayClusterConfig:\n"


def render(manifest: str, config: str) -> str:
    """``manifest`` with its serveConfigV2 block replaced by ``config``."""
    start = manifest.index(BEGIN) + len(BEGIN)
    end = manifest.index(END, start)
    block = "".join(f"    {line}" if line.strip() else "\n" for line in config.splitlines(True))
    return manifest[:start] + block + manifest[end:]


def main() -> int:
    manifest = MANIFEST.read_text()
    updated = render(manifest, CONFIG.read_text())
    if updated != manifest:
        MANIFEST.write_text(updated)
        print(f"updated {MANIFEST.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
