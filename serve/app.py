"""Ray Serve: an OpenAI-compatible ingress in front of an autoscaling LLaVA model deployment.

    llava-ray serve --checkpoint runs/demo/stage2_ov/hf --config serve/serve.yaml
    serve run serve/serve_config.yaml        # or: serve deploy serve/serve_config.yaml

The model deployment loads an HF checkpoint (a path or s3:// URI, safetensors only) in ``__init__``
and prompts with the very components training used (tiling, templates), so the two cannot drift.
Each replica runs an engine (components/engine.py) that batches at every decode step: requests join at
the next step and leave when they finish, streamed and non-streamed alike; a bounded queue answers 429
beyond it. Vision features of media seen before come from a per-replica cache (components/feature_cache.py).
"""

import asyncio
import concurrent.futures
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field

import ray
import torch
import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.exceptions import HTTPException

from components.engine import Engine, EngineConfig, Job, QueueFull
from components.feature_cache import FeatureCache
from components.model import load_model, max_positions, torch_threads
from components.prefix_cache import PrefixCache
from components.processor import LlavaProcessor
from components.resample import warm_up
from serve.protocol import (
    ChatRequest,
    KnownMedia,
    Limits,
    RequestError,
    check_prompt,
    has_media,
    internal_error,
    parse_body,
    parse_chat_request,
)
from serve.routing import SESSION_HEADER, conversation_key

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Everything about serving one model; ``from_dict`` takes the YAML form."""

    checkpoint: str
    """An HF export of ours (path or s3:// URI)."""
    model_name: str = "llava-ray"
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Each replica's decode batch and queue (components/scheduler.py): past the queue, a 429 (the client
    retries, or another replica takes it)."""
    feature_cache_mb: float = 256.0
    """Vision features of recently seen media kept per replica (LRU; 0: none)."""
    prefix_cache_mb: float = 1024.0
    """Finished turns' key/value caches kept per replica, so the next turn of a conversation prefills only
    its new tokens (LRU; 0: none). On a GPU replica it is GPU memory."""
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
    router: str = "conversation"
    """How requests find a model replica: ``conversation`` (serve/routing.py: every turn of a chat on one
    replica, where its prefix and feature caches are) or ``power_of_two`` (Serve's default)."""
    router_imbalance: int | None = None
    """The queue-length lead at which a conversation's replica is passed over for the least loaded (None:
    the engine's max_batch_size, so a request waits behind a full batch there only when no other replica
    is as busy)."""

    def __post_init__(self) -> None:
        if isinstance(self.limits, dict):
            self.limits = Limits(**self.limits)
        if isinstance(self.engine, dict):
            self.engine = EngineConfig(**self.engine)
        if self.router not in ROUTERS:
            raise ValueError(f"router: expected one of {list(ROUTERS)}, found {self.router!r}")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"replicas: expected 1 <= min <= max, found {self.min_replicas}, {self.max_replicas}"
            )

    @classmethod
    def from_dict(cls, data: dict) -> "ServeConfig":
        return cls(**data)


ROUTERS = ("conversation", "power_of_two")


def _router_config(config: ServeConfig) -> RequestRouterConfig:
    """The model deployment's router: ours, or Serve's own default (named by Ray, not by its private path)."""
    if config.router == "power_of_two":
        return RequestRouterConfig()
    return RequestRouterConfig(
        request_router_class="serve.routing:ConversationRouter",
        request_router_kwargs={"imbalance": config.router_imbalance or config.engine.max_batch_size},
    )


def _error(exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


RETRY_AFTER_S = 1
"""A 429's Retry-After: a replica's queue moves at the pace of decode steps (milliseconds to a second)."""


def _refused(result: dict) -> JSONResponse:
    """A replica's refusal in OpenAI's shape; a 429 says when to retry (Retry-After), as clients expect."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if result["status"] == 429 else None
    return JSONResponse(result["error"], status_code=result["status"], headers=headers)


def _where_headers(where: dict) -> dict:
    """Which replica answered, and on which node (operators tracing a request, streamed or not)."""
    return {"x-llava-ray-replica": where.get("replica", ""), "x-llava-ray-node": where.get("node", "")}


def _usage(prompt: int, completion: int, cached: int = 0) -> dict:
    """OpenAI's usage, with the prompt tokens whose KV came from the replica's prefix cache."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _rate_limited(exc: QueueFull) -> dict:
    """OpenAI's shape for a 429: clients (the openai package included) back off and retry."""
    return {
        "error": {
            "message": f"{exc}; retry later",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }


@serve.deployment
class LlavaModel:
    """One replica: the model, and the engine (components/engine.py) whose loop owns it. Every request,
    streamed or not, joins the engine's batch at its next decode step and leaves it when it finishes."""

    def __init__(self, config: dict):

        warm_up()  # tiling kernels compiled before the first request, not during it
        self.config = ServeConfig.from_dict(config)
        torch.set_num_threads(torch_threads(self.config.replica_cpus))
        # the checkpoint's processor: the template, tiling and video sampling it was trained with
        self.model, self.processor = load_model(self.config.checkpoint)
        if self.config.replica_gpus > 0:  # Ray set CUDA_VISIBLE_DEVICES to this replica's GPU
            self.model.to("cuda", torch.bfloat16)
        self.model.eval()
        features = None
        if self.config.feature_cache_mb > 0:
            features = FeatureCache(int(self.config.feature_cache_mb * 2**20))
        prefix = None
        if self.config.prefix_cache_mb > 0:
            prefix = PrefixCache(int(self.config.prefix_cache_mb * 2**20))
        self.engine = Engine(
            self.model, self.processor, self.config.engine, features=features, prefix=prefix
        ).start()
        # tiling and tokenizing off the engine's thread, so that decode steps go on meanwhile
        self.rows = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="rows")
        # which replica answered, and on which node: a response header (operators tracing a request)
        self.where = {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node": ray.get_runtime_context().get_node_id(),
        }

    def stats(self) -> dict:
        """The engine's recent decode steps (batch sizes), its queue, and the feature cache's counts."""
        out = self.engine.stats()
        if self.engine.features is not None:
            out["features"] = self.engine.features.stats()
        if self.engine.prefix is not None:
            out["prefix"] = self.engine.prefix.stats()
        return out

    async def _submit(self, request: ChatRequest) -> tuple[asyncio.Queue, Job]:
        """The request's row (built in a worker thread) handed to the engine; its events arrive on the
        returned queue. Raises QueueFull past the engine's queue."""
        loop = asyncio.get_running_loop()
        row = await loop.run_in_executor(self.rows, self.engine.row, request.prompt, request.media_digests)
        events: asyncio.Queue = asyncio.Queue()
        job = Job(
            row=row,
            max_new_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=tuple(request.stop),
            stream=request.stream,
            n=request.n,
            grammar=request.grammar,
            emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
        )
        self.engine.submit(job)
        return events, job

    async def generate(self, request: ChatRequest) -> dict:
        try:
            events, job = await self._submit(request)
        except QueueFull as e:
            return {"error": _rate_limited(e), "status": 429}
        choices: dict[int, dict] = {}
        try:
            while len(choices) < request.n:
                event = await events.get()
                if "done" in event:
                    choices[event.get("index", 0)] = event["done"]
                elif "error" in event:
                    return {"error": internal_error("generate", event["error"]), "status": 500}
            ordered = [choices[i] for i in range(request.n)]
            out = {**ordered[0], "choices": ordered, "where": self.where}
            if request.return_token_ids:
                out["prompt_token_ids"] = [int(t) for t in job.row["input_ids"]]
            return out
        finally:
            job.cancelled = True  # the caller gave up (a timeout): the engine drops it at its next step

    async def stream(self, request: ChatRequest):
        """First ``{"accepted": true}`` (or the error that refused it), then text deltas as the engine
        produces them (``{"delta", "index"}``), each choice's ``{"finish", "index"}``, then the usage."""
        try:
            events, job = await self._submit(request)
        except QueueFull as e:
            yield json.dumps({"error": _rate_limited(e), "status": 429})
            return
        yield json.dumps({"accepted": True, "where": self.where})
        done: list[dict] = []
        try:
            while len(done) < request.n:
                event = await events.get()
                index = event.get("index", 0)
                if "delta" in event:
                    yield json.dumps({"delta": event["delta"], "index": index})
                elif "done" in event:
                    done.append(event["done"])
                    yield json.dumps({"finish": event["done"]["finish_reason"], "index": index})
                else:
                    yield json.dumps({"error": internal_error("stream", event["error"]), "status": 500})
                    return
            completion = sum(d["completion_tokens"] for d in done)
            yield json.dumps(
                {"usage": _usage(done[0]["prompt_tokens"], completion, done[0]["cached_tokens"])}
            )
        finally:
            job.cancelled = True  # a client that hung up frees its place in the batch


app = FastAPI(title="llava-ray", description="OpenAI-compatible LLaVA endpoint")


@app.exception_handler(HTTPException)
async def _framework_error(request: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's own 404 and 405, in the OpenAI error shape."""
    body = {
        "error": {
            "message": f"{request.method} {request.url.path}: expected a route of this API, "
            f"found {exc.detail}",
            "type": "invalid_request_error",
            "param": None,
            "code": str(exc.status_code),
        }
    }
    return JSONResponse(body, status_code=exc.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(RequestError("request", "a valid request", str(exc)[:200]).body(), status_code=400)


@app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse(internal_error(request.url.path, exc), status_code=500)


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP in front: auth, parsing and limits (4xx, never 5xx, for bad input), the OpenAI schema out."""

    def __init__(self, model, config: dict):

        self.model = model
        self.config = ServeConfig.from_dict(config)
        self.api_key = os.environ.get(self.config.api_key_env) or None
        # the checkpoint's processor (no weights): its video sampling decodes the frames training saw, and
        # every prompt is counted here, against the model's positions, before it joins a batch
        self.processor = LlavaProcessor.from_pretrained(self.config.checkpoint)
        self.positions = max_positions(self.config.checkpoint)
        limits = self.config.limits
        # media fetches and decodes in their own bounded pool: a slow upstream delays only its request
        self.media_pool = concurrent.futures.ThreadPoolExecutor(
            limits.fetch_concurrency, thread_name_prefix="media"
        )
        self.text_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="text")
        self.known = (
            KnownMedia()
        )  # media seen valid before: not decoded again (see the replica's feature cache)

    def _check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.api_key}":
            raise RequestError(
                "Authorization",
                "'Bearer <api key>'",
                "a missing or wrong key",
                param="authorization",
                status=401,
                code="invalid_api_key",
            )

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.config.model_name}

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._check_auth(request)
        except RequestError as e:
            return _error(e)
        return {
            "object": "list",
            "data": [
                {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "llava-ray"}
            ],
        }

    async def _body(self, request: Request) -> bytes:
        """The body, read up to the limit (413 past it, without reading the rest)."""
        limit = self.config.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise RequestError("body", f"at most {limit} bytes", str(declared), status=413, code="too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError("body", f"at most {limit} bytes", "more", status=413, code="too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def _parse(self, body, session: str | None) -> ChatRequest:
        """Every check before a request reaches the model: fields, media (fetched, budgeted, decoded with the
        checkpoint's video sampling), and its prompt's tokens against the model's positions; then the key
        that routes it to its conversation's replica."""
        limits = self.config.limits
        parsed = parse_chat_request(body, [self.config.model_name], limits, self.processor.video, self.known)
        check_prompt(parsed, self.processor.count_tokens, self.positions, limits)
        parsed.conversation = conversation_key(parsed.prompt.turns, parsed.media_digests, session)
        return parsed

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        try:
            self._check_auth(request)
            body = parse_body(await self._body(request), self.config.limits)
            pool = self.media_pool if has_media(body) else self.text_pool
            session = request.headers.get(SESSION_HEADER)
            if session is not None and not 0 < len(session) <= 256:
                raise RequestError(
                    SESSION_HEADER, "1 to 256 characters", f"{len(session)}", param=SESSION_HEADER
                )
            parsed = await asyncio.get_running_loop().run_in_executor(pool, self._parse, body, session)
        except RequestError as e:
            return _error(e)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if parsed.stream:
            items = self.model.options(stream=True).stream.remote(parsed)
            first = json.loads(await items.__anext__())  # accepted, or refused (4xx/429) before any event
            if "error" in first:
                return _refused(first)
            return StreamingResponse(
                self._sse(parsed, completion_id, items),
                media_type="text/event-stream",
                headers=_where_headers(first.get("where", {})),
            )
        try:
            result = await asyncio.wait_for(
                self.model.generate.remote(parsed), timeout=self.config.request_timeout_s
            )
        except TimeoutError:
            return JSONResponse(
                {
                    "error": {
                        "message": f"request: expected an answer within "
                        f"{self.config.request_timeout_s}s, found none",
                        "type": "timeout",
                    }
                },
                status_code=504,
            )
        if "error" in result:
            return _refused(result)
        choices = result.get("choices", [result])
        completion = sum(c["completion_tokens"] for c in choices)
        body = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": parsed.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c["text"]},
                    "finish_reason": c["finish_reason"],
                }
                for i, c in enumerate(choices)
            ],
            "usage": _usage(result["prompt_tokens"], completion, result.get("cached_tokens", 0)),
        }
        if parsed.return_token_ids:  # vLLM's fields
            body["prompt_token_ids"] = result["prompt_token_ids"]
            for choice, c in zip(body["choices"], choices, strict=True):
                choice["token_ids"] = c["token_ids"]
        return JSONResponse(body, headers=_where_headers(result.get("where", {})))

    async def _sse(self, parsed: ChatRequest, completion_id: str, items):
        created = int(time.time())

        def chunk(delta: dict, finish: str | None = None, index: int = 0) -> str:
            body = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": parsed.model,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(body)}\n\n"

        for index in range(parsed.n):
            yield chunk({"role": "assistant", "content": ""}, index=index)
        usage = None
        try:
            async for piece in items:
                item = json.loads(piece)
                if "error" in item:  # an error mid-stream: an error event, then the end of the stream
                    yield f"data: {json.dumps(item['error'])}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if item.get("delta"):
                    yield chunk({"content": item["delta"]}, index=item.get("index", 0))
                if item.get("finish"):
                    yield chunk({}, item["finish"], index=item.get("index", 0))
                usage = item.get("usage", usage)
        except Exception as e:
            log.exception("stream %s failed", completion_id)
            yield f"data: {json.dumps(internal_error('stream', e))}\n\n"
            yield "data: [DONE]\n\n"
            return
        if parsed.include_usage and usage:  # OpenAI's shape: a last chunk with no choices, and the usage
            body = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": parsed.model,
                "choices": [],
                "usage": usage,
            }
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"


def build_app(config: ServeConfig, model_deployment=None):
    """The Serve application: Ingress -> LlavaModel (autoscaling, batching, limits from the config).
    ``model_deployment``: another replica class with LlavaModel's methods (a benchmark's baseline)."""
    model = (
        (model_deployment or LlavaModel)
        .options(
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
            request_router_config=_router_config(config),
        )
        .bind(asdict(config))
    )
    # the ingress only parses and awaits: it must admit every request the model replicas can hold (Serve's
    # default of 5 would cap the batches at 5 whatever engine.max_batch_size says)
    ingress = Ingress.options(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=config.max_ongoing_requests * config.max_replicas,
    )
    return ingress.bind(model, asdict(config))


def app_builder(args: dict):
    """For ``serve run`` / ``serve deploy``: the ``args`` of the Serve config file are a ServeConfig."""
    return build_app(ServeConfig.from_dict(dict(args)))


def load_serve_config(path: str | None, checkpoint: str | None) -> ServeConfig:

    data = {}
    if path:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    if checkpoint:
        data["checkpoint"] = checkpoint
    if not data.get("checkpoint"):
        raise ValueError("serve: expected --checkpoint or checkpoint: in the config, found neither")
    return ServeConfig.from_dict(data)
