"""Stability's own SDK, used as its upscale document and README use it, against our server.

Run with the python of the SDK's own virtual environment (tests/clients/stability-sdk.txt),
never beside Ray: ``python stability_sdk_client.py '<JSON spec>'``. It prints one JSON
object: the artifacts answered (each saved as a file under the spec's ``out`` folder), or
the gRPC error the call ended with. Only the SDK, Pillow and the standard library here.

Spec: ``{"host": "localhost:9000", "out": "/tmp/x", "op": "upscale" | "generate" | "cancel",
"engine": ..., "init": path, "mask": path, ...the call's keyword arguments}``.
"""

import io
import json
import os
import sys
import threading

import grpc
from PIL import Image
from stability_sdk import client
import stability_sdk.interfaces.gooseai.generation.generation_pb2 as generation
from stability_sdk.utils import sampler_from_string


def artifacts(answers, out):
    """The answers' artifacts, as the document's loop reads them."""
    found = []
    for resp in answers:
        for artifact in resp.artifacts:
            item = {"type": artifact.type, "finish_reason": artifact.finish_reason,
                    "filtered": artifact.finish_reason == generation.FILTER,
                    "mime": artifact.mime, "seed": artifact.seed, "index": artifact.index,
                    "answer_id": resp.answer_id, "engine": resp.meta.engine_id}
            if artifact.type == generation.ARTIFACT_IMAGE:
                image = Image.open(io.BytesIO(artifact.binary))
                path = os.path.join(out, f"{resp.answer_id}.png")
                image.save(path)
                item.update(size=list(image.size), path=path)
            found.append(item)
    return found


def call(spec):
    op = spec.pop("op")
    host, out = spec.pop("host"), spec.pop("out")
    engine = spec.pop("engine", None)
    for key in ("init", "mask"):
        if key in spec:
            spec[f"{key}_image"] = Image.open(spec.pop(key))
    if "sampler" in spec:
        spec["sampler"] = sampler_from_string(spec["sampler"])
    if op == "upscale":
        api = client.StabilityInference(host=host, key="unused-over-plain-text",
                                        upscale_engine=engine or "esrgan-v1-x2plus")
        init = spec.pop("init_image")
        return artifacts(api.upscale(init_image=init, **spec), out)
    api = client.StabilityInference(host=host, key="unused-over-plain-text",
                                    engine=engine or "stable-diffusion-xl-1024-v1-0")
    if op == "generate":
        return artifacts(api.generate(**spec), out)
    if op == "cancel":
        # The SDK's generator hides the call; its stub returns it, and cancel() is gRPC's.
        after_s = spec.pop("cancel_after_s")
        request = generation.Request(
            engine_id=api.engine, request_id="cancelled",
            prompt=[generation.Prompt(text=spec.pop("prompt"))],
            image=generation.ImageParameters(
                height=spec["height"], width=spec["width"], steps=spec["steps"], seed=[spec["seed"]],
                parameters=[generation.StepParameter(sampler=generation.SamplerParameters(cfg_scale=7.0))]),
        )
        answers = api.stub.Generate(request, wait_for_ready=True)
        threading.Timer(after_s, answers.cancel).start()
        return artifacts(answers, out)
    raise ValueError(f"unknown op {op!r}")


def main():
    spec = json.loads(sys.argv[1])
    try:
        result = {"artifacts": call(spec)}
    except grpc.RpcError as error:
        result = {"error": {"code": error.code().name, "details": error.details()}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
