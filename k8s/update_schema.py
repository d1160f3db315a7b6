"""Store the RayService v1 schema of a KubeRay CRD file in k8s/schema/rayservice-v1.json.

    python3 k8s/update_schema.py path/to/ray.io_rayservices.yaml
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

SCHEMA = Path(__file__).resolve().parent / "schema" / "rayservice-v1.json"


def v1_schema(crd: dict) -> dict:
    """``spec.versions[name=v1].schema.openAPIV3Schema`` of a RayService CRD."""
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    crd = yaml.safe_load(Path(argv[0]).read_text())
    SCHEMA.write_text(json.dumps(v1_schema(crd), separators=(",", ":")) + "\n")
    print(f"wrote {SCHEMA}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
