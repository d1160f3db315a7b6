"""CI's first calls against the README's server command (``serve run configs/tiny.yaml``):
wait for ``/health`` to answer 200, then ask for an image with and without a LoRA adapter and
check that both are PNGs of the asked size and that the adapter changed the picture; then
upscale one through Stability's gRPC API on port 9000, as its SDK calls it.

Standard library only: it starts beside the server command's install, so packages that
install puts in place are not on this interpreter's path; the gRPC call (grpcio and the
project's stubs) runs in a new interpreter of the environment once the server answers.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request

BASE = "http://127.0.0.1:8000"


def call(path: str, body: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(BASE + path, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_healthy(seconds: float, pid: int | None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            status, _ = call("/health", timeout=5)
            if status == 200:
                return
        except OSError:
            pass
        if not alive(pid):
            raise SystemExit("the server command exited before /health answered 200")
        time.sleep(3)
    raise SystemExit(f"/health did not answer 200 within {seconds:.0f} s")


def png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise SystemExit("the image is not a PNG")
    return struct.unpack(">II", data[16:24])


def generate(loras: dict | None) -> bytes:
    body = {"model": "stable-diffusion-2-1", "prompt": "a lighthouse at dusk", "size": "512x512",
            "seed": 7, "response_format": "b64_json"}
    if loras:
        body["loras"] = loras
    status, answer = call("/v1/images/generations", body)
    if status != 200:
        raise SystemExit(f"generation {body} answered {status}: {answer[:500]!r}")
    image = base64.b64decode(json.loads(answer)["data"][0]["b64_json"])
    if png_size(image) != (512, 512):
        raise SystemExit(f"expected a 512x512 image, got {png_size(image)}")
    return image


def upscale_over_grpc() -> None:
    """ESRGAN x2 through ``gooseai.GenerationService/Generate`` on the config's port 9000."""
    import grpc

    from serve_app.fronts.gooseai import generation_pb2 as generation
    from serve_app.fronts.gooseai import generation_pb2_grpc

    image = base64.b64decode(  # an 8x8 PNG, red (ESRGAN takes 8 pixels a side at least)
        "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAEUlEQVR42mP8z4AdMDEMKQkAzUEBD7t4NqoAAAAASUVORK5CYII=")
    request = generation.Request(engine_id="esrgan-v1-x2plus", request_id="ci", prompt=[
        generation.Prompt(artifact=generation.Artifact(type=generation.ARTIFACT_IMAGE, binary=image))])
    with grpc.insecure_channel("localhost:9000") as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        try:
            answers = list(stub.Generate(request, timeout=180, wait_for_ready=True))
        except grpc.RpcError as error:
            raise SystemExit(f"gRPC Generate on 9000 failed: {error.code().name} {error.details()}")
    sizes = [png_size(a.binary) for answer in answers for a in answer.artifacts]
    if sizes != [(16, 16)]:
        raise SystemExit(f"gRPC Generate: expected one 16x16 image, got {sizes}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wait", type=float, default=600, help="seconds to wait for /health")
    parser.add_argument("--pid", type=int, help="the server command's process: stop waiting if it exits")
    parser.add_argument("--grpc-only", action="store_true", help="only the gRPC upscale (a running server)")
    args = parser.parse_args()
    if args.grpc_only:
        upscale_over_grpc()
        return 0
    started = time.monotonic()
    wait_healthy(args.wait, args.pid)
    print(f"first_request: /health 200 after {time.monotonic() - started:.0f} s", flush=True)
    plain = generate(None)
    with_ink = generate({"ink": 1.0})
    if plain == with_ink:
        raise SystemExit("the LoRA adapter 'ink' did not change the image")
    print(f"first_request: a 512x512 image with and without LoRA 'ink' "
          f"({time.monotonic() - started:.0f} s in all)", flush=True)
    # A new interpreter: it sees what the server command's install put in place.
    if subprocess.run([sys.executable, __file__, "--grpc-only"], timeout=300).returncode != 0:
        raise SystemExit("the upscale over gRPC failed (its reason is above)")
    print(f"first_request: ESRGAN x2 over gRPC on port 9000 "
          f"({time.monotonic() - started:.0f} s in all)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
