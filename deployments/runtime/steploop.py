"""Step-level continuous batching (``batching.mode: step``): jobs join and leave a running
batch at every denoising step.

Each job runs the pipeline's own call (``pipe(...)``: its own ``encode_prompt``,
``prepare_latents``, timesteps, scheduler step, classifier-free guidance, inpainting blend,
VAE decode and upcasting rules) on a thread of its own, through a *view* of the pipeline
with a scheduler instance of its own and, in place of the UNet and of the VAE's decode,
*call proxies* that hand the call to the replica's :class:`StepLoop`. The step loop owns the
UNet: once every job in flight has asked for its next UNet call (or its decode), it runs
**one** UNet call for the rows of the jobs it takes (each row with its own timestep: the
UNet embeds a timestep per sample) and hands each job its rows back, and **one** VAE decode
for the jobs that finished on the same step. So each job gets the image ``pipe(...)`` gives
it alone, whatever ran beside it, and jobs that differ in steps, guidance, strength, seed,
prompt, denoising start and end or LoRA adapters share every step (each job's rows run its
own adapters at its weights: deployments/runtime/lora_slots.py); only the latent shape
separates them.

One device lock serialises the work on the model: a job's thread holds it while it runs
(text encoding, latents, scheduler steps, image post-processing) and lets go while it waits
for the loop; the loop holds it for its calls. So finished jobs decode between two steps of
the others, and a new job prepares between two steps and joins the next one.

Why a loop of our own, and what other servers do: docs/architecture.md, "Batching".

One module, over 400 lines: the loop, its call proxies and its batcher share one lock and
one step boundary; apart they would each need the other's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from deployments.runtime.batching import (RECENT_BATCHES, BatchEntry, BatchStats, JobQueue, PipelineCancelled,
                                         adapters_fit)
from deployments.contract import StageResult

# How many of the latest UNet calls' row counts a replica keeps for tests and benchmarks.
RECENT_CALLS = 1000


@dataclass(eq=False)
class StepSlot:
    """One job in the step loop: its pending UNet request, its answer, and its cost."""

    cancelled: Callable[[], bool]
    arrived: float = 0.0  # when its job was queued (time.monotonic()): its place in line
    on_first_step: Callable[[float], None] | None = None  # told time.monotonic() after its first
    request: tuple | None = None  # (sample, timestep, kwargs) while it waits for the UNet
    decode: tuple | None = None  # (vae, latents, dtype) while it waits for its VAE decode
    answer: Any = None
    error: BaseException | None = None
    lora: dict | None = None  # its LoRA slots' weights (slot -> weight) for its rows
    calls: int = 0  # UNet calls it took part in (its denoising steps)
    seconds: float = 0.0  # its own work, plus its rows' share of each UNet call
    _held_since: float = 0.0
    # Set when the loop has answered its request: each job waits on its own event, so an
    # answer wakes only the jobs of that call (not every job in flight at every step).
    _answered: threading.Event = field(default_factory=threading.Event)


@dataclass
class StepStats:
    unet_calls: int = 0
    unet_seconds: float = 0.0  # in all the UNet calls
    decode_calls: int = 0
    decoded: int = 0  # images decoded
    rows: list[int] = field(default_factory=list)  # rows of the latest RECENT_CALLS calls
    seconds: list[float] = field(default_factory=list)  # the same calls' seconds
    jobs: list[int] = field(default_factory=list)  # jobs of the same calls


class _UNetProxy:
    """What a job's pipeline view has as its ``unet``: the real UNet's attributes (config,
    dtype, device, add_embedding, ...), and calls that go through the step loop."""

    def __init__(self, loop: StepLoop, slot: StepSlot):
        self._loop, self._slot = loop, slot

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop.unet, name)

    def __call__(self, sample, timestep, encoder_hidden_states=None, return_dict=True, **kwargs):
        answer = self._loop.unet_call(self._slot, sample, timestep, encoder_hidden_states, kwargs)
        return (answer,) if not return_dict else _Output(answer)


class _VAEProxy:
    """What a job's pipeline view has as its ``vae``: the real VAE's attributes; its decode
    goes through the step loop (jobs that finish together decode in one call).

    Its dtype is the job's own: the pipelines cast the VAE to float32 around an encode or a
    decode where it overflows in float16 (SDXL's, ``force_upcast``) and back after; on the
    VAE every job shares, that would race with the others' encodes and decodes. So ``to``
    records the dtype the job asked for, and each real call runs the VAE in it, casting it
    and back within the call (while it holds the device)."""

    def __init__(self, loop: StepLoop, slot: StepSlot, vae: Any):
        self._loop, self._slot, self._vae, self._dtype = loop, slot, vae, vae.dtype

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vae, name)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def to(self, *args, dtype: torch.dtype | None = None, **kwargs) -> _VAEProxy:
        # The pipelines call vae.to(dtype=...) or vae.to(torch.float32) here, nothing else.
        dtypes = [arg for arg in args if isinstance(arg, torch.dtype)]
        self._dtype = dtype or (dtypes[0] if dtypes else self._dtype)
        return self

    @property
    def post_quant_conv(self) -> Any:
        # SDXL's pipelines cast the latents to this layer's parameters' dtype to decode.
        return _InDtype(self._vae.post_quant_conv, self._dtype)

    def encode(self, *args, **kwargs) -> Any:
        with _vae_in(self._vae, self._dtype):  # the job's thread holds the device here
            return self._vae.encode(*args, **kwargs)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None, **kwargs) -> Any:
        if kwargs:  # an asymmetric VAE's image and mask: not one our families have
            raise TypeError(f"vae.decode in step mode takes no {', '.join(kwargs)}")
        image = self._loop.decode_call(self._slot, self._vae, z, self._dtype)
        return (image,) if not return_dict else _Output(image)


class _InDtype:
    def __init__(self, module: Any, dtype: torch.dtype):
        self._module, self._dtype = module, dtype

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def parameters(self, *args, **kwargs):
        return (parameter.to(self._dtype) for parameter in self._module.parameters(*args, **kwargs))


@contextlib.contextmanager
def _vae_in(vae: Any, dtype: torch.dtype):
    """Run the VAE in ``dtype`` for the block, and put it back after."""
    was = vae.dtype
    if was != dtype:
        vae.to(dtype=dtype)
    try:
        yield
    finally:
        if was != dtype:
            vae.to(dtype=was)


@dataclass
class _Output:
    sample: torch.Tensor

    def __getitem__(self, index):
        return (self.sample,)[index]


def _signature(request: tuple) -> tuple:
    """What must match for requests to share a UNet call: shapes past the rows, dtypes, and
    the extra arguments' keys and non-tensor values."""
    sample, _, kwargs = request
    parts = [tuple(sample.shape[1:]), sample.dtype]
    for name in sorted(kwargs):
        value = kwargs[name]
        if isinstance(value, torch.Tensor):
            parts.append((name, tuple(value.shape[1:]), value.dtype))
        elif isinstance(value, dict):
            parts.append((name, tuple(sorted((k, tuple(v.shape[1:])) if isinstance(v, torch.Tensor)
                                            else (k, repr(v)) for k, v in value.items()))))
        else:
            parts.append((name, repr(value)))
    return tuple(parts)


def _per_row(timestep, rows: int, device) -> torch.Tensor:
    timestep = torch.as_tensor(timestep, device=device)
    return timestep.reshape(1).expand(rows) if timestep.numel() == 1 else timestep.reshape(rows)


def _cat(values: list[Any]) -> Any:
    """Requests' values side by side: tensors along the rows, dicts key by key."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values)
    if isinstance(first, dict):
        return {key: _cat([value[key] for value in values]) for key in first}
    return first  # None, or the same value in every request (part of the signature)


class StepLoop:
    """The replica's UNet, shared by the jobs in flight one step at a time.

    ``unet`` is the pipeline's UNet; ``max_rows`` bounds the rows of one call (the memory of
    its activations); ``setup`` runs once on the loop's own thread (torch's CPU thread count
    is per OS thread). ``on_call(rows, seconds)`` is told of each call;
    ``before_call(slots, rows)`` runs on the device just before each UNet call, with the
    jobs it takes and their rows (the replica weighs their LoRA rows there).

    Which waiting jobs a call takes: when jobs that have not taken a step yet wait, those
    alone (a new job's first step is a short call of its own, right after the call in
    progress, instead of a full call's worth of the others, for one call's fixed cost a
    job: ``python3 benchmarks/steps.py`` measures that wait, benchmarks/results/steps-sim.md
    holds its figures); otherwise the others oldest first, up to ``max_rows`` (the job that
    has waited longest finishes first, so the tail of the latency is the queue's, not a
    share of an ever-growing batch). The rest wait between
    two of their steps, holding only their latents and conditioning. One call takes at
    least one job, and jobs of one signature (latent shape, conditioning shapes: the batcher
    admits one cohort at a time, so there is one but for the refiner's chain share).
    """

    def __init__(self, unet: Any, name: str, max_rows: int, setup: Callable[[], None] | None = None,
                 on_call: Callable[[int, float], None] | None = None,
                 before_call: Callable[[list[StepSlot], list[int]], None] | None = None):
        self.unet = unet
        self._before_call = before_call
        self.max_rows = max_rows
        self.stats = StepStats()
        self._device = threading.Lock()
        self._state = threading.Condition()
        self._slots: list[StepSlot] = []
        self._setup, self._on_call = setup, on_call
        # A thread of its own, not a pool's: it lives as long as the replica and waits for
        # work; a daemon, so that it never holds a process at exit.
        threading.Thread(target=self._serve, name=f"{name}-steps", daemon=True).start()

    # --- the jobs' side (each on its own thread) ---

    def join(self, slot: StepSlot, work: Callable[[], Any]) -> Any:
        """Join the loop as ``slot`` for ``work`` (a job's pipeline call through its view):
        call it holding the device except while it waits for the UNet, then leave."""
        with self._state:
            self._slots.append(slot)
        self._hold(slot)
        try:
            return work()
        finally:
            self._let_go(slot)
            with self._state:
                self._slots.remove(slot)
                self._state.notify_all()

    def view(self, pipe: Any, slot: StepSlot) -> Any:
        """``pipe`` as one job runs it: the same modules, a scheduler of its own (schedulers
        keep a job's state: step index, sigmas, a multistep solver's history), and the step
        loop in place of the UNet."""
        view = copy.copy(pipe)
        # object.__setattr__: a pipeline's own __setattr__ would write into its config,
        # which the view shares with the replica's pipeline.
        object.__setattr__(view, "unet", _UNetProxy(self, slot))
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is not None:
            object.__setattr__(view, "scheduler", type(scheduler).from_config(scheduler.config))
        vae = getattr(pipe, "vae", None)
        if vae is not None:
            object.__setattr__(view, "vae", _VAEProxy(self, slot, vae))
        return view

    def unet_call(self, slot: StepSlot, sample, timestep, encoder_hidden_states, kwargs) -> torch.Tensor:
        if slot.cancelled():
            raise PipelineCancelled("the caller has gone")
        kwargs = {**kwargs, "encoder_hidden_states": encoder_hidden_states}
        return self._wait(slot, "request", (sample, timestep, kwargs))

    def decode_call(self, slot: StepSlot, vae: Any, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._wait(slot, "decode", (vae, latents, dtype))

    def _wait(self, slot: StepSlot, kind: str, request: tuple) -> Any:
        """Hand ``request`` to the loop as ``slot``'s ``kind``, and wait for the answer
        without the device."""
        self._let_go(slot)
        try:
            with self._state:
                slot._answered.clear()
                setattr(slot, kind, request)
                self._state.notify_all()  # only the loop waits on it
            slot._answered.wait()
            answer, error, slot.answer, slot.error = slot.answer, slot.error, None, None
        finally:
            self._hold(slot)
        if error is not None:
            raise error
        return answer

    def _hold(self, slot: StepSlot) -> None:
        self._device.acquire()
        slot._held_since = time.perf_counter()

    def _let_go(self, slot: StepSlot) -> None:
        slot.seconds += time.perf_counter() - slot._held_since
        self._device.release()

    # --- the loop's side ---

    def _ready(self) -> bool:
        """A step boundary: every job in flight waits for the loop (none is between two of
        its steps, after its end, or preparing its first step). A new job prepares on the
        device (text encoders, latents) in turn with the others' scheduler steps, so waiting
        for it costs the device nothing, and it joins the very next call."""
        return bool(self._slots) and all(
            slot.request is not None or slot.decode is not None for slot in self._slots)

    def _serve(self) -> None:
        """The loop's thread: one call at a time, for ever."""
        if self._setup is not None:
            self._setup()
        while True:
            # One call at a time, chosen afresh at each boundary (a job that came during the
            # last call, or during a decode, takes the next one): a new job's first step
            # first (its wait to start is the one the loop can keep to a step), then the
            # decodes of jobs that have finished (they leave; one waits a step at most),
            # then the step of the others.
            with self._state:
                self._state.wait_for(self._ready)
                for slot in self._slots:  # gone while it waited its turn: it leaves now
                    if slot.request is not None and slot.cancelled():
                        slot.request, slot.error = None, PipelineCancelled("the caller has gone")
                        slot._answered.set()
                waiting = [slot for slot in self._slots if slot.request is not None]
                slots = self._choose(waiting) if waiting else []
                decodes = [] if any(slot.calls == 0 for slot in slots) else self._choose_decodes(
                    [slot for slot in self._slots if slot.decode is not None])
            if not (slots or decodes):
                continue
            kind, chosen, call = ("decode", decodes, self._decode) if decodes else ("request", slots, self._call)
            try:
                call(chosen)
            except BaseException as exc:  # noqa: BLE001 - the loop lives on; the jobs get it
                for slot in chosen:
                    if slot.answer is None:
                        slot.error = exc
            with self._state:
                for slot in chosen:
                    setattr(slot, kind, None)
            for slot in chosen:
                slot._answered.set()

    def _choose(self, waiting: list[StepSlot]) -> list[StepSlot]:
        """The jobs the next call takes (see the class's docstring)."""
        waiting.sort(key=lambda slot: (slot.calls > 0, slot.arrived))
        if waiting[0].calls == 0:  # new jobs' first step: a call of their own
            waiting = [slot for slot in waiting if slot.calls == 0]
        signature = _signature(waiting[0].request)
        chosen, rows = [], 0
        for slot in waiting:
            count = slot.request[0].shape[0]
            if chosen and rows + count > self.max_rows:
                continue  # a smaller job behind it may fit
            if _signature(slot.request) == signature:
                chosen.append(slot)
                rows += count
        return chosen

    def _choose_decodes(self, waiting: list[StepSlot]) -> list[StepSlot]:
        """The finished jobs the next decode takes: the oldest's VAE, latent shape and
        dtype, up to a UNet call's images (its rows / 2), at least one job."""
        if not waiting:
            return []
        waiting.sort(key=lambda slot: slot.arrived)

        def key(slot):
            vae, latents, dtype = slot.decode
            return id(vae), tuple(latents.shape[1:]), latents.dtype, dtype

        first, chosen, images = key(waiting[0]), [], 0
        for slot in waiting:
            count = slot.decode[1].shape[0]
            if key(slot) == first and (not chosen or images + count <= self.max_rows // 2):
                chosen.append(slot)
                images += count
        return chosen

    def _on_device(self, slots: list[StepSlot], counts: list[int], compute: Callable[[], torch.Tensor]
                   ) -> float | None:
        """Run ``compute`` (one batched call of the jobs' ``counts`` rows) on the device and
        hand each job its rows and their share of the time; returns the seconds, or None
        when it failed (every job of the call gets the error)."""
        self._device.acquire()
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                answers = list(compute().split(counts))
        except BaseException as exc:  # noqa: BLE001 - every job of the call gets it
            for slot in slots:
                slot.error = exc
            return None
        finally:
            seconds = time.perf_counter() - started
            self._device.release()
        total = sum(counts)
        for slot, answer, count in zip(slots, answers, counts):
            slot.answer = answer
            slot.seconds += seconds * count / total
        return seconds

    def _decode(self, slots: list[StepSlot]) -> None:
        vae, _, dtype = slots[0].decode
        counts = [slot.decode[1].shape[0] for slot in slots]

        def decode() -> torch.Tensor:
            with _vae_in(vae, dtype):
                return vae.decode(torch.cat([slot.decode[1] for slot in slots]), return_dict=False)[0]

        if self._on_device(slots, counts, decode) is not None:
            self.stats.decode_calls += 1
            self.stats.decoded += sum(counts)

    def _call(self, slots: list[StepSlot]) -> None:
        rows = [slot.request[0].shape[0] for slot in slots]

        def unet() -> torch.Tensor:
            if self._before_call is not None:
                self._before_call(slots, rows)
            samples = [slot.request[0] for slot in slots]
            # One timestep per row: each job's own, over its rows (both halves of its guidance).
            timesteps = torch.cat([_per_row(slot.request[1], count, sample.device)
                                   for slot, sample, count in zip(slots, samples, rows)])
            kwargs = _cat([slot.request[2] for slot in slots])
            return self.unet(torch.cat(samples), timesteps, return_dict=False, **kwargs)[0]

        seconds = self._on_device(slots, rows, unet)
        if seconds is None:
            return
        now = time.monotonic()
        for slot in slots:
            slot.calls += 1
            if slot.calls == 1 and slot.on_first_step is not None:
                slot.on_first_step(now)
        self.stats.unet_calls += 1
        self.stats.unet_seconds += seconds
        self.stats.rows.append(sum(rows))
        self.stats.jobs.append(len(slots))
        self.stats.seconds.append(seconds)
        for recent in (self.stats.rows, self.stats.jobs, self.stats.seconds):
            del recent[:-RECENT_CALLS]
        if self._on_call is not None:
            self._on_call(sum(rows), seconds)


class StepBatcher:
    """The event loop's side of step mode: which queued jobs start, each on a thread of its
    own (``run_job(entry)`` returns ``(output, steps, seconds)``), to join the step loop.

    Its jobs wait in a :class:`~deployments.runtime.batching.JobQueue`, as the request batcher's do
    (the replica calls ``submit`` and reads ``stats`` on either); what it does with them is
    its own: each job starts alone, when admitted, and ends alone.

    Admission, at every arrival and every job's end:

    - a job joins the jobs in flight when it has their *cohort* (latent shape: the batch key
      the deployment gives in step mode), the images in flight stay within
      ``max_images_in_flight`` and the LoRA adapters in flight within ``max_adapters`` (the
      UNet's slots); in arrival order, so a large job is not overtaken for ever. (Which of them each UNet call takes is the step loop's choice, within its rows.)
    - with nothing in flight, the oldest queued job's cohort goes next;
    - once a job of another cohort, or one whose adapters do not fit beside those in
      flight, has waited ``max_shape_wait_s``, no more joins: the jobs in flight drain and
      that job goes next (a stream of one shape or one adapter set never starves another).
    """

    def __init__(self, run_job: Callable[[BatchEntry], tuple], max_images_in_flight: int,
                 max_shape_wait_s: float, on_batch: Callable[[int, list[float]], None] | None = None,
                 thread_name: str = "pipeline", max_adapters: int | None = None):
        self.queue = JobQueue(self._admit_now)
        self.max_adapters = max_adapters
        self.on_batch = on_batch
        self.max_images_in_flight = max_images_in_flight
        # One thread per job in flight (a job has at least one image).
        self.executor = ThreadPoolExecutor(max_workers=max_images_in_flight, thread_name_prefix=f"{thread_name}-job")
        self.run_job = run_job
        self.max_shape_wait_s = max_shape_wait_s
        self.in_flight: list[BatchEntry] = []
        self.cohort: Any = None

    @property
    def stats(self) -> BatchStats:
        """What this replica's jobs did (the queue's counters)."""
        return self.queue.stats

    async def submit(self, kind: str, job: Any, inputs: tuple, key: Any, images: int,
                     preview: Any = None, adapters: frozenset = frozenset()) -> Any:
        """Queue a job and wait for its result (raised if the job failed)."""
        return await self.queue.submit(kind, job, inputs, key, images, preview, adapters)

    async def _admit_now(self) -> None:
        self._admit()

    @staticmethod
    def _cohort_of(entry: BatchEntry) -> Any:
        return entry.key[1]  # JobQueue.submit keys entries (kind, key); kinds share the UNet

    def _admit(self) -> None:
        pending = [entry for entry in self.queue.pending if not entry.future.done()]
        if not pending:
            return
        now = time.monotonic()
        if not self.in_flight:
            self.cohort = self._cohort_of(pending[0])
        held = frozenset().union(*(entry.adapters for entry in self.in_flight))
        if self.in_flight and any(
                now - entry.queued_at > self.max_shape_wait_s
                and (self._cohort_of(entry) != self.cohort or not adapters_fit(held, entry, self.max_adapters))
                for entry in pending):
            return  # another shape, or adapters beyond the free slots, waited long enough: next
        images = sum(entry.images for entry in self.in_flight)
        for entry in pending:
            if self._cohort_of(entry) != self.cohort:
                continue
            if self.in_flight and images + entry.images > self.max_images_in_flight:
                break
            if self.in_flight and not adapters_fit(held, entry, self.max_adapters):
                continue  # its adapters wait for a slot; a later job of those in flight may join
            self.queue.pending.remove(entry)
            self.in_flight.append(entry)
            images += entry.images
            held |= entry.adapters
            self.stats.batch_sizes.append(entry.images)
            del self.stats.batch_sizes[:-RECENT_BATCHES]
            if self.on_batch is not None:
                self.on_batch(entry.images, [now - entry.queued_at])
            asyncio.get_running_loop().create_task(self._job(entry))

    async def _job(self, entry: BatchEntry) -> None:
        """Run one admitted job on its thread and settle its future."""
        # As asyncio.to_thread does: the job's thread sees this task's context (request ids).
        context = contextvars.copy_context()
        try:
            output, steps, seconds = await asyncio.get_running_loop().run_in_executor(
                self.executor, context.run, self.run_job, entry)
        except PipelineCancelled as exc:
            self.stats.cancelled_running += 1
            if not entry.future.done():
                entry.future.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - handed to the job's caller
            if not entry.future.done():
                entry.future.set_exception(exc)
        else:
            self.stats.pipeline_calls += 1
            self.stats.images += entry.images
            if not entry.future.done():
                entry.future.set_result(StageResult(output, steps, seconds))
        finally:
            self.in_flight.remove(entry)
            self._admit()
