"""Instruction-data generation on Ray Data against any OpenAI-compatible chat endpoint.

    llava-ray generate --images instances.json --captions captions.json \\
        --types conversation,detail,reasoning --endpoint http://127.0.0.1:8000/v1 --model teacher \\
        --out runs/instruct

Reads top to bottom: annotations and prompt packs on the driver, the Stage-1 naive expansion, then one
work item per (image, response type) through ``Teacher`` actors: bounded requests in flight per actor,
a global rate limit (one token-bucket actor), retries with backoff on 429, 5xx and timeouts. Each
batch's results are written as they finish (retry-safe names), so a re-run skips every id already
generated; parse failures go to the rejects with the raw text. The API key comes from the environment
and is never logged.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import ray

from components import storage
from components.instruct import (
    TYPES,
    ImageAnnotations,
    ParseError,
    build_messages,
    load_packs,
    naive_expansion,
    parse_response,
)

log = logging.getLogger(__name__)

ITEM_SCHEMA = pa.schema([("image_id", pa.string()), ("kind", pa.string()), ("annotations", pa.string())])


@dataclass
class GenerateConfig:
    endpoint: str
    """An OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1."""
    model: str
    out: str
    types: list[str] = field(default_factory=lambda: list(TYPES))
    api_key_env: str = "OPENAI_API_KEY"
    """The environment variable holding the key (sent as a Bearer token; never logged)."""
    concurrency: int = 4
    """Requests in flight per actor."""
    workers: int = 2
    rate_limit_rps: float = 20.0
    """Requests per second across all actors."""
    max_retries: int = 5
    timeout_s: float = 60.0
    backoff_s: float = 0.5
    max_new_tokens: int = 512
    """Sent as the request's max_tokens."""
    temperature: float = 0.7
    seed: int = 0
    prompt_pack: str | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        unknown = set(self.types) - set(TYPES)
        if unknown or not self.types:
            raise ValueError(f"types: expected a subset of {TYPES}, found {self.types}")


@ray.remote(num_cpus=0)
class RateLimiter:
    """A token bucket shared by every actor: ``acquire`` returns how long the caller must wait."""

    def __init__(self, rps: float):
        self.interval = 1.0 / rps
        self.next = time.monotonic()

    def acquire(self) -> float:
        now = time.monotonic()
        start = max(now, self.next)
        self.next = start + self.interval
        return start - now


class Teacher:
    """A map_batches callable: calls the endpoint for its items, writes results as a part file."""

    def __init__(self, config: dict, limiter):
        self.config = GenerateConfig(**config)
        self.limiter = limiter
        self.key = os.environ.get(self.config.api_key_env)
        self.packs = load_packs(self.config.prompt_pack)
        import requests

        self.session = requests.Session()

    def _post(self, messages: list[dict]) -> tuple[str | None, str, int]:
        """(text, error, attempts): retries on 429 / 5xx / timeouts / connection errors, with backoff."""
        import requests

        c = self.config
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        body = {
            "model": c.model,
            "messages": messages,
            "max_tokens": c.max_new_tokens,
            "temperature": c.temperature,
            "seed": c.seed,
        }
        error = ""
        for attempt in range(c.max_retries + 1):
            time.sleep(ray.get(self.limiter.acquire.remote()))
            try:
                r = self.session.post(
                    f"{c.endpoint.rstrip('/')}/chat/completions",
                    json=body,
                    headers=headers,
                    timeout=c.timeout_s,
                )
                if r.status_code == 200:
                    return r.json()["choices"][0]["message"]["content"], "", attempt + 1
                error = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code != 429 and r.status_code < 500:
                    return None, error, attempt + 1  # a client error will not get better
                delay = float(r.headers.get("Retry-After", 0) or 0)
            except (requests.Timeout, requests.ConnectionError) as e:
                error, delay = f"{type(e).__name__}", 0.0
            time.sleep(max(delay, c.backoff_s * (2**attempt)))
        return None, error, c.max_retries + 1

    def _one(self, item: dict) -> dict:
        ctx = ImageAnnotations(**json.loads(item["annotations"]))
        text, error, attempts = self._post(build_messages(self.packs[item["kind"]], ctx))
        result = {"id": f"{ctx.image_id}-{item['kind']}", "kind": item["kind"], "attempts": attempts}
        if text is None:
            return {**result, "status": "failed", "error": error}
        try:
            return {
                **result,
                "status": "ok",
                "record": parse_response(item["kind"], text, ctx, self.config.seed),
            }
        except ParseError as e:
            return {**result, "status": "rejected", "error": str(e), "raw": e.raw}

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = batch.to_pylist()
        with concurrent.futures.ThreadPoolExecutor(self.config.concurrency) as pool:
            results = list(pool.map(self._one, items))
        done = [r for r in results if r["status"] != "failed"]
        if done:  # generated (or rejected with its raw text): never asked for again
            digest = hashlib.sha256(json.dumps(sorted(r["id"] for r in done)).encode()).hexdigest()[:20]
            storage.write_text(
                storage.join(self.config.out, "parts", f"part-{digest}.jsonl"),
                "".join(json.dumps(r) + "\n" for r in done),
            )
        return pa.Table.from_pylist(
            [
                {"id": r["id"], "status": r["status"], "attempts": r["attempts"], "error": r.get("error", "")}
                for r in results
            ]
        )


def done_ids(out: str) -> set[str]:
    ids = set()
    for rel in storage.list_files(storage.join(out, "parts")):
        for line in storage.read_text(storage.join(out, "parts", rel)).splitlines():
            ids.add(json.loads(line)["id"])
    return ids


def generate(annotations: list[ImageAnnotations], config: GenerateConfig) -> dict:
    """Generate the missing (image, type) items; write the merged manifest, rejects and a summary."""
    log.info("generate config: %s", json.dumps({k: v for k, v in asdict(config).items()}))  # holds no key
    brief = naive_expansion(annotations, config.seed)
    storage.write_text(storage.join(config.out, "brief.jsonl"), "".join(json.dumps(r) + "\n" for r in brief))
    done = done_ids(config.out)
    items = [
        {"image_id": c.image_id, "kind": k, "annotations": json.dumps(asdict(c))}
        for c in annotations
        for k in config.types
        if f"{c.image_id}-{k}" not in done
    ]
    statuses = []
    if items:
        limiter = RateLimiter.remote(config.rate_limit_rps)
        ds = ray.data.from_arrow(pa.Table.from_pylist(items, schema=ITEM_SCHEMA)).repartition(
            max(1, min(len(items), config.workers * 4))
        )
        ds = ds.map_batches(
            Teacher,
            fn_constructor_args=(asdict(config), limiter),
            batch_format="pyarrow",
            batch_size=config.batch_size,
            num_cpus=0.25,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.workers),
        )
        statuses = ds.take_all()
    records, rejects = [], []
    for rel in storage.list_files(storage.join(config.out, "parts")):
        for line in storage.read_text(storage.join(config.out, "parts", rel)).splitlines():
            r = json.loads(line)
            (records if r["status"] == "ok" else rejects).append(r)
    records.sort(key=lambda r: r["id"])
    storage.write_text(
        storage.join(config.out, "llava_instruct.jsonl"),
        "".join(json.dumps(r["record"]) + "\n" for r in records),
    )
    storage.write_text(
        storage.join(config.out, "rejects.jsonl"),
        "".join(json.dumps(r) + "\n" for r in sorted(rejects, key=lambda r: r["id"])),
    )
    failed = [s for s in statuses if s["status"] == "failed"]
    summary = {
        "requested": len(items),
        "skipped_done": len(done),
        "generated": sum(1 for s in statuses if s["status"] == "ok"),
        "rejected": sum(1 for s in statuses if s["status"] == "rejected"),
        "failed": len(failed),
        "retried_requests": sum(s["attempts"] - 1 for s in statuses),
        "total_records": len(records),
        "brief_records": len(brief),
    }
    storage.write_text(storage.join(config.out, "summary.json"), json.dumps(summary, indent=1))
    if failed:
        storage.write_text(
            storage.join(config.out, "failed.jsonl"), "".join(json.dumps(s) + "\n" for s in failed)
        )
    print(json.dumps(summary))
    return summary


def read_annotations(
    images: str, captions: str | None = None, image_prefix: str = ""
) -> list[ImageAnnotations]:
    """COCO annotation JSON (instances and/or captions) or the plain JSONL form."""
    from components.instruct import read_annotations_jsonl, read_coco

    if images.endswith(".jsonl"):
        return read_annotations_jsonl(storage.read_text(images))
    instances = json.loads(storage.read_text(images))
    caps = json.loads(storage.read_text(captions)) if captions else None
    return read_coco(instances, caps, image_prefix)
