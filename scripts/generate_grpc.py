#!/usr/bin/env python3
"""Generate the Python code of the gRPC front's protocol (serve_app/fronts/gooseai/).

    python3 scripts/generate_grpc.py          # write generation_pb2.py and generation_pb2_grpc.py
    python3 scripts/generate_grpc.py --check  # exit 1 if the committed files differ

The code is made with grpcio-tools of the same minor release as the grpcio that Ray
installs (the test extra pins it; constraints.txt locks both), so the generated modules
need nothing newer than what the server already has: Stability's own SDK package pins
grpcio < 1.64 and protobuf < 6 and cannot be installed beside Ray, so the server never
imports it. The files are committed; a unit test runs ``--check``.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import metadata, resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("serve_app/fronts/gooseai/generation.proto")
OUTPUTS = ("generation_pb2.py", "generation_pb2_grpc.py")


def minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def generate(out_root: Path) -> None:
    """Run protoc (grpcio-tools') on the proto, rooted at the repository so the generated
    modules import each other as ``serve_app.fronts.gooseai``."""
    from grpc_tools import protoc

    tools, grpc = metadata.version("grpcio-tools"), metadata.version("grpcio")
    if minor(tools) != minor(grpc):
        raise SystemExit(f"grpcio-tools {tools} does not match grpcio {grpc}: install "
                         f"grpcio-tools=={'.'.join(minor(grpc))}.* (pip install -e '.[test]')")
    well_known = resources.files("grpc_tools") / "_proto"
    code = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"-I{well_known}",
                        f"--python_out={out_root}", f"--grpc_python_out={out_root}",
                        str(ROOT / PROTO)])
    if code != 0:
        raise SystemExit(f"protoc failed on {PROTO} (exit {code})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed files instead of writing them")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        made = Path(tmp) / PROTO.parent
        stale = [name for name in OUTPUTS
                 if not (ROOT / PROTO.parent / name).exists()
                 or not filecmp.cmp(made / name, ROOT / PROTO.parent / name, shallow=False)]
        if args.check:
            for name in stale:
                print(f"{PROTO.parent / name} is not what {PROTO} generates; run "
                      "python3 scripts/generate_grpc.py", file=sys.stderr)
            return 1 if stale else 0
        for name in OUTPUTS:
            shutil.copyfile(made / name, ROOT / PROTO.parent / name)
        print(f"wrote {', '.join(str(PROTO.parent / n) for n in OUTPUTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
