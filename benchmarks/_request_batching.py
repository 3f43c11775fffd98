"""The replica as it was before the engine (components/engine.py): batches formed between batches with
``serve.batch`` and an adaptive wait, and each stream a ``generate`` of its own under the model lock. Kept
only as the baseline of benchmarks/serve.py (``build_app(config, RequestBatchedModel)``)."""

import asyncio
import collections
import json
import logging
import threading
import time
from types import SimpleNamespace

import ray
import torch
from ray import serve
from transformers import TextIteratorStreamer

from components.batching import to_device
from components.generation import generate
from components.model import load_model, torch_threads
from components.resample import warm_up
from serve.protocol import ChatRequest, internal_error

log = logging.getLogger(__name__)
IDLE_BATCH_WAIT_S = 0.001


@serve.deployment
class RequestBatchedModel:
    """One replica as it was before the engine: a batched generate between batches (``serve.batch``), and
    each stream its own ``generate`` under the model lock. Kept as the baseline that benchmarks/serve.py
    measures the engine against."""

    def __init__(self, config: dict):

        warm_up()  # tiling kernels compiled before the first request, not during it
        self.config = SimpleNamespace(
            **{
                **config,
                "batching": True,
                "batch_wait_timeout_s": 0.05,
                "adaptive_batch_wait": True,
                "limits": SimpleNamespace(**config["limits"]),
            }
        )
        torch.set_num_threads(torch_threads(self.config.replica_cpus))
        # the checkpoint's processor: the template, tiling and video sampling it was trained with
        self.model, self.processor = load_model(self.config.checkpoint)
        self.tokenizer = self.processor.tokenizer
        if self.config.replica_gpus > 0:  # Ray set CUDA_VISIBLE_DEVICES to this replica's GPU
            self.model.to("cuda", torch.bfloat16)
        self.model.eval()
        self.generate_batched.set_max_batch_size(config["engine"]["max_batch_size"])
        self.lock = threading.Lock()
        self.ongoing = 0
        self.overlapped_at = -1e9
        self.batch_seconds = 0.0
        self.batches, self.largest_batch = 0, 0
        self.longest_batch_wait_s = 0.0
        self.queue_waits: collections.deque = collections.deque(maxlen=256)
        self.idle: asyncio.Event | None = None
        self._set_batch_wait()

        # which replica answered, and on which node: a response header (operators tracing a request)
        self.where = {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node": ray.get_runtime_context().get_node_id(),
        }

    def _set_batch_wait(self) -> None:
        wait = self.config.batch_wait_timeout_s
        if self.config.adaptive_batch_wait:
            overlapping = time.monotonic() - self.overlapped_at < 1.0
            wait = min(wait, 0.5 * self.batch_seconds) if overlapping else IDLE_BATCH_WAIT_S
        self.batch_wait_s = wait
        self.longest_batch_wait_s = max(self.longest_batch_wait_s, wait)
        self.generate_batched.set_batch_wait_timeout_s(wait)

    def stats(self) -> dict:
        """This replica's batching so far (for operators and tests); ``queue_waits_s``: the latest requests'
        (batch size, seconds from reaching the replica to their batch's start), measured."""
        return {
            "batches": self.batches,
            "largest_batch": self.largest_batch,
            "batch_wait_s": self.batch_wait_s,
            "longest_batch_wait_s": self.longest_batch_wait_s,
            "batch_seconds": self.batch_seconds,
            "queue_waits_s": list(self.queue_waits),
        }

    def _row(self, request: ChatRequest) -> dict:
        return self.processor.prompt_row(request.prompt.decoded(self.processor.video))

    def _run(self, requests: list[ChatRequest]) -> list[dict]:
        """Sub-batches of compatible requests (sampling, seed, video frame count), greedy ones together."""

        out: list[dict | None] = [None] * len(requests)
        rows = {i: self._row(r) for i, r in enumerate(requests)}
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            frames = (
                len(r.prompt.video_frames) if r.prompt.video_frames is not None else 0
            )  # EncodedVideo too
            key = (r.temperature, r.top_p, r.seed, frames, tuple(r.stop))
            groups.setdefault(key, []).append(i)
        for (temperature, top_p, seed, _, stop), members in groups.items():

            def run(ids, temperature=temperature, top_p=top_p, seed=seed, stop=stop):
                with self.lock:
                    return generate(
                        self.model,
                        self.processor,
                        [rows[i] for i in ids],
                        max_new_tokens=max(requests[i].max_new_tokens for i in ids),
                        temperature=temperature,
                        top_p=top_p,
                        stop=list(stop),
                        seed=seed,
                    )

            try:
                results = dict(zip(members, run(members), strict=True))
            except Exception:  # one request's failure must not fail the others: each again, alone
                results = {}
                for i in members:
                    try:
                        results[i] = run([i])[0]
                    except Exception as e:
                        log.exception("request %s failed", i)
                        out[i] = {"error": internal_error("generate", e), "status": 500}
            for i, res in results.items():
                out[i] = self._trim(res, requests[i].max_new_tokens)
        return out

    def _trim(self, result: dict, max_tokens: int) -> dict:
        """A request batched with longer ones keeps only its own max_tokens (greedy: the same tokens)."""
        if result["completion_tokens"] > max_tokens:
            ids = self.tokenizer.encode(result["text"], add_special_tokens=False)[:max_tokens]
            result = {
                **result,
                "text": self.tokenizer.decode(ids, skip_special_tokens=True),
                "completion_tokens": max_tokens,
                "finish_reason": "length",
            }
        return result

    def _idle(self) -> asyncio.Event:
        """Set while no batch runs (made on the replica's event loop, at its first request)."""
        if self.idle is None:
            self.idle = asyncio.Event()
            self.idle.set()
        return self.idle

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batched(self, arrivals: list[tuple[float, ChatRequest]]) -> list[dict]:
        """``arrivals``: (when the request reached this replica, the request); the time from there to its
        batch's start is measured (``stats()['queue_waits_s']``)."""
        start = time.perf_counter()
        self.queue_waits.extend((len(arrivals), start - arrived) for arrived, _ in arrivals)
        requests = [request for _, request in arrivals]
        self._idle().clear()
        try:
            out = await asyncio.get_running_loop().run_in_executor(None, self._run, requests)
        finally:
            self.idle.set()
        took = time.perf_counter() - start
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(requests))
        self.batch_seconds = took if not self.batch_seconds else 0.7 * self.batch_seconds + 0.3 * took
        self._set_batch_wait()
        return out

    async def generate(self, request: ChatRequest) -> dict:
        return {**await self._generate(request), "where": self.where}

    async def _generate(self, request: ChatRequest) -> dict:
        if self.config.batching:
            self.ongoing += 1
            if self.ongoing > 1:
                self.overlapped_at = time.monotonic()
            try:
                # Serve forms the next batch as soon as a request arrives, even while a batch runs: requests
                # that came during a long batch would each become a batch of one, queued behind it. So a
                # request waits here for the running batch to end, and all that waited join the next one.
                arrived = time.perf_counter()
                await self._idle().wait()
                return await self.generate_batched((arrived, request))
            finally:
                self.ongoing -= 1
        return (await asyncio.get_running_loop().run_in_executor(None, self._run, [request]))[0]

    async def stream(self, request: ChatRequest):
        """Text deltas as the model produces them (HF's TextIteratorStreamer in a worker thread)."""

        row = self._row(request)
        yield json.dumps({"accepted": True})

        batch = self.processor.collate([row], left_pad=True)
        batch.pop("labels")
        batch = to_device(batch, self.model.device, self.model.dtype)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(
            **batch,
            max_new_tokens=request.max_new_tokens,
            streamer=streamer,
            eos_token_id=self.processor.stop_ids,
            pad_token_id=self.processor.pad_token_id,
            do_sample=request.temperature > 0,
        )
        if request.temperature > 0:
            kwargs.update(temperature=request.temperature, top_p=request.top_p)

        failure = []

        def work():
            try:
                with self.lock:
                    if request.seed is not None:
                        torch.manual_seed(request.seed)  # a seeded stream samples as the same seeded request
                    self.model.generate(**kwargs)
            except Exception as e:  # the stream ends with an error event, not a cut connection
                log.exception("stream failed")
                failure.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        loop = asyncio.get_running_loop()
        stops = [s for s in request.stop if s]
        produced = ""
        while True:
            piece = await loop.run_in_executor(None, lambda: next(streamer, None))
            if piece is None:
                break
            produced += piece
            cut = min((produced.index(s) for s in stops if s in produced), default=None)
            if cut is not None:
                yield json.dumps(
                    {"delta": piece[: max(0, len(piece) - (len(produced) - cut))], "finish": "stop"}
                )
                break
            if piece:
                yield json.dumps({"delta": piece})
        thread.join()
        if failure:
            yield json.dumps({"error": internal_error("stream", failure[0]), "status": 500})
