"""Ray Serve: an OpenAI-compatible ingress in front of an autoscaling, batching LLaVA model deployment.

    llava-ray serve --checkpoint runs/demo/stage2_ov/hf --config serve/serve.yaml
    serve run serve/serve_config.yaml        # or: serve deploy serve/serve_config.yaml

The model deployment loads an HF checkpoint (a path or s3:// URI, safetensors only) in ``__init__``
and prompts with the very components training used (tiling, templates), so the two cannot drift.
Generate calls are batched (``serve.batch``); streaming requests take a token streamer.
"""

import asyncio
import collections
import concurrent.futures
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from components.conversation import SampleTooLongError
from serve.protocol import (
    ChatRequest,
    Limits,
    RequestError,
    check_prompt,
    has_media,
    parse_body,
    parse_chat_request,
)

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Everything about serving one model; ``from_dict`` takes the YAML form."""

    checkpoint: str
    """An HF export of ours (path or s3:// URI)."""
    model_name: str = "llava-ray"
    batching: bool = True
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05
    """The longest a batch waits for more requests after its first one."""
    adaptive_batch_wait: bool = True
    """Wait only when it pays: while requests overlap (two or more at the replica within the last second),
    up to half the recent batch run time (at most batch_wait_timeout_s), so that requests on their way
    back join the next batch; with one request at a time, 1 ms (nothing else is coming)."""
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    max_ongoing_requests: int = 32
    request_timeout_s: float = 120.0
    max_replicas_per_node: int | None = None
    """At most this many model replicas on one node (1: one per node, e.g. one per GPU host); None: any."""
    replica_cpus: float = 0.5
    replica_gpus: float = 0.0
    """GPUs per replica (Ray's ``num_gpus``); above 0 the replica loads the model on its GPU in bf16."""
    api_key_env: str = "LLAVA_RAY_API_KEY"
    """When this environment variable is set, requests need ``Authorization: Bearer <its value>``."""
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if isinstance(self.limits, dict):
            self.limits = Limits(**self.limits)
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"replicas: expected 1 <= min <= max, found {self.min_replicas}, {self.max_replicas}"
            )

    @classmethod
    def from_dict(cls, data: dict) -> "ServeConfig":
        return cls(**data)


IDLE_BATCH_WAIT_S = 0.001


def _error(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _internal(where: str, exc: BaseException) -> dict:
    """An OpenAI-style body for our own failure: what failed, never a traceback or a host path."""
    return {"error": {"message": f"{where}: expected an answer, found an internal error ({type(exc).__name__})",
                      "type": "server_error", "param": None, "code": "internal_error"}}  # fmt: skip


@serve.deployment
class LlavaModel:
    """One replica: the model, its tokenizer, and a batched generate."""

    def __init__(self, config: dict):
        import torch

        from components.model import load_model
        from components.resample import warm_up

        warm_up()  # tiling kernels compiled before the first request, not during it
        self.config = ServeConfig.from_dict(config)
        torch.set_num_threads(max(1, int(self.config.replica_cpus)))
        # the checkpoint's processor: the template, tiling and video sampling it was trained with
        self.model, self.processor = load_model(self.config.checkpoint)
        self.tokenizer = self.processor.tokenizer
        if self.config.replica_gpus > 0:  # Ray set CUDA_VISIBLE_DEVICES to this replica's GPU
            self.model.to("cuda", torch.bfloat16)
        self.model.eval()
        self.generate_batched.set_max_batch_size(self.config.max_batch_size)
        self.lock = threading.Lock()
        self.ongoing = 0
        self.overlapped_at = -1e9
        self.batch_seconds = 0.0
        self.batches, self.largest_batch = 0, 0
        self.longest_batch_wait_s = 0.0
        self.queue_waits: collections.deque = collections.deque(maxlen=256)
        self.idle: asyncio.Event | None = None
        self._set_batch_wait()
        import ray

        # which replica answered, and on which node: a response header (operators tracing a request)
        self.where = {"replica": serve.get_replica_context().replica_id.unique_id,
                      "node": ray.get_runtime_context().get_node_id()}  # fmt: skip

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
        return {"batches": self.batches, "largest_batch": self.largest_batch, "batch_wait_s": self.batch_wait_s,
                "longest_batch_wait_s": self.longest_batch_wait_s, "batch_seconds": self.batch_seconds,
                "queue_waits_s": list(self.queue_waits)}  # fmt: skip

    def _row(self, request: ChatRequest) -> dict:
        try:
            return self.processor.prompt_row(request.prompt)
        except SampleTooLongError as e:
            raise RequestError(
                f"messages: expected at most {self.config.limits.max_prompt_tokens} prompt tokens, found {e.length}",
                "messages",
                400,
                "context_length_exceeded",
            ) from e

    def _run(self, requests: list[ChatRequest]) -> list[dict]:
        """Sub-batches of compatible requests (sampling, seed, video frame count), greedy ones together."""
        from components.generation import generate

        out: list[dict | None] = [None] * len(requests)
        rows = {}
        for i, r in enumerate(requests):
            try:
                rows[i] = self._row(r)
            except RequestError as e:
                out[i] = {"error": e.body(), "status": e.status}
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            if i in rows:
                frames = len(r.prompt.video_frames) if r.prompt.video_frames is not None else 0
                key = (r.temperature, r.top_p, r.seed, frames, tuple(r.stop))
                groups.setdefault(key, []).append(i)
        for (temperature, top_p, seed, _, stop), members in groups.items():

            def run(ids, temperature=temperature, top_p=top_p, seed=seed, stop=stop):
                with self.lock:
                    return generate(self.model, self.processor, [rows[i] for i in ids],
                                    max_new_tokens=max(requests[i].max_tokens for i in ids), temperature=temperature,
                                    top_p=top_p, stop=list(stop), seed=seed)  # fmt: skip

            try:
                results = dict(zip(members, run(members), strict=True))
            except Exception:  # one request's failure must not fail the others: each again, alone
                results = {}
                for i in members:
                    try:
                        results[i] = run([i])[0]
                    except Exception as e:
                        log.exception("request %s failed", i)
                        out[i] = {"error": _internal("generate", e), "status": 500}
            for i, res in results.items():
                out[i] = self._trim(res, requests[i].max_tokens)
        return out

    def _trim(self, result: dict, max_tokens: int) -> dict:
        """A request batched with longer ones keeps only its own max_tokens (greedy: the same tokens)."""
        if result["completion_tokens"] > max_tokens:
            ids = self.tokenizer.encode(result["text"], add_special_tokens=False)[:max_tokens]
            result = {**result, "text": self.tokenizer.decode(ids, skip_special_tokens=True),
                      "completion_tokens": max_tokens, "finish_reason": "length"}  # fmt: skip
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
        from transformers import TextIteratorStreamer

        try:
            row = self._row(request)
        except RequestError as e:
            yield json.dumps({"error": e.body(), "status": e.status})
            return
        import torch

        from components.batching import to_device

        batch = self.processor.collate([row], left_pad=True)
        batch.pop("labels")
        batch = to_device(batch, self.model.device, self.model.dtype)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**batch, max_new_tokens=request.max_tokens, streamer=streamer,
                      eos_token_id=self.processor.stop_ids, pad_token_id=self.processor.pad_token_id,
                      do_sample=request.temperature > 0)  # fmt: skip
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
            yield json.dumps({"error": _internal("stream", failure[0]), "status": 500})


app = FastAPI(title="llava-ray", description="OpenAI-compatible LLaVA endpoint")


@app.exception_handler(HTTPException)
async def _framework_error(request: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's own 404 and 405, in the OpenAI error shape."""
    body = {"error": {"message": f"{request.method} {request.url.path}: expected a route of this API, found {exc.detail}",
                      "type": "invalid_request_error", "param": None, "code": str(exc.status_code)}}  # fmt: skip
    return JSONResponse(body, status_code=exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(
        RequestError(f"request: expected a valid request, found {str(exc)[:200]}").body(), status_code=400
    )


@app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse(_internal(request.url.path, exc), status_code=500)


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP in front: auth, parsing and limits (4xx, never 5xx, for bad input), the OpenAI schema out."""

    def __init__(self, model, config: dict):
        from components.model import context_length
        from components.processor import LlavaProcessor

        self.model = model
        self.config = ServeConfig.from_dict(config)
        self.api_key = os.environ.get(self.config.api_key_env) or None
        # the checkpoint's processor (no weights): its video sampling decodes the frames training saw, and
        # every prompt is counted here, against the model's context, before it joins a batch
        self.processor = LlavaProcessor.from_pretrained(self.config.checkpoint)
        self.context = context_length(self.config.checkpoint)
        limits = self.config.limits
        # media fetches and decodes in their own bounded pool: a slow upstream delays only its request
        self.media_pool = concurrent.futures.ThreadPoolExecutor(
            limits.fetch_concurrency, thread_name_prefix="media"
        )
        self.text_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="text")

    def _check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.api_key}":
            raise RequestError("Authorization: expected 'Bearer <api key>', found a missing or wrong key",
                               "authorization", 401, "invalid_api_key")  # fmt: skip

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.config.model_name}

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._check_auth(request)
        except RequestError as e:
            return _error(e)
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model", "created": 0,
                                            "owned_by": "llava-ray"}]}  # fmt: skip

    async def _body(self, request: Request) -> bytes:
        """The body, read up to the limit (413 past it, without reading the rest)."""
        limit = self.config.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError(
                f"body: expected at most {limit} bytes, found {declared}", "body", 413, "too_large"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(
                    f"body: expected at most {limit} bytes, found more", "body", 413, "too_large"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _parse(self, body) -> ChatRequest:
        """Every check before a request reaches the model: fields, media (fetched, budgeted, decoded with the
        checkpoint's video sampling), and its prompt's tokens against the context."""
        limits = self.config.limits
        parsed = parse_chat_request(body, [self.config.model_name], limits, self.processor.video)
        check_prompt(parsed, self.processor.count_tokens, self.context, limits)
        return parsed

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        try:
            self._check_auth(request)
            body = parse_body(await self._body(request), self.config.limits)
            pool = self.media_pool if has_media(body) else self.text_pool
            parsed = await asyncio.get_running_loop().run_in_executor(pool, self._parse, body)
        except RequestError as e:
            return _error(e)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if parsed.stream:
            return StreamingResponse(self._sse(parsed, completion_id), media_type="text/event-stream")
        try:
            result = await asyncio.wait_for(
                self.model.generate.remote(parsed), timeout=self.config.request_timeout_s
            )
        except TimeoutError:
            return JSONResponse({"error": {"message": f"request: expected an answer within "
                                           f"{self.config.request_timeout_s}s, found none", "type": "timeout"}},
                                status_code=504)  # fmt: skip
        if "error" in result:
            return JSONResponse(result["error"], status_code=result["status"])
        body = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": parsed.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                         "finish_reason": result["finish_reason"]}],
            "usage": {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                      "total_tokens": result["prompt_tokens"] + result["completion_tokens"]},
        }  # fmt: skip
        where = result.get("where", {})
        headers = {"x-llava-ray-replica": where.get("replica", ""), "x-llava-ray-node": where.get("node", "")}
        return JSONResponse(body, headers=headers)

    async def _sse(self, parsed: ChatRequest, completion_id: str):
        created = int(time.time())

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": parsed.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
            return f"data: {json.dumps(body)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        finish = "length"
        try:
            async for piece in self.model.options(stream=True).stream.remote(parsed):
                item = json.loads(piece)
                if "error" in item:  # an error mid-stream: an error event, then the end of the stream
                    yield f"data: {json.dumps(item['error'])}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if item.get("delta"):
                    yield chunk({"content": item["delta"]})
                if item.get("finish"):
                    finish = item["finish"]
        except Exception as e:
            log.exception("stream %s failed", completion_id)
            yield f"data: {json.dumps(_internal('stream', e))}\n\n"
            yield "data: [DONE]\n\n"
            return
        yield chunk({}, finish)
        yield "data: [DONE]\n\n"


def build_app(config: ServeConfig):
    """The Serve application: Ingress -> LlavaModel (autoscaling, batching, limits from the config)."""
    model = LlavaModel.options(
        autoscaling_config={
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "initial_replicas": config.min_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
            "upscale_delay_s": config.upscale_delay_s,
            "downscale_delay_s": config.downscale_delay_s,
            "metrics_interval_s": 1.0,
            "look_back_period_s": 2.0,
        },
        max_ongoing_requests=config.max_ongoing_requests,
        max_replicas_per_node=config.max_replicas_per_node,
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
    ).bind(asdict(config))
    # the ingress only parses and awaits: it must admit every request the model replicas can hold (Serve's
    # default of 5 would cap the batches at 5 whatever max_batch_size says)
    ingress = Ingress.options(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=config.max_ongoing_requests * config.max_replicas,
    )
    return ingress.bind(model, asdict(config))


def app_builder(args: dict):
    """For ``serve run`` / ``serve deploy``: the ``args`` of the Serve config file are a ServeConfig."""
    return build_app(ServeConfig.from_dict(dict(args)))


def load_serve_config(path: str | None, checkpoint: str | None) -> ServeConfig:
    import yaml

    data = {}
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    if checkpoint:
        data["checkpoint"] = checkpoint
    if not data.get("checkpoint"):
        raise ValueError("serve: expected --checkpoint or checkpoint: in the config, found neither")
    return ServeConfig.from_dict(data)
