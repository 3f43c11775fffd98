"""Serving, the engine against the replica before it, side by side in one run, through real HTTP (the openai
client) on 127.0.0.1, one replica each (1 CPU, one torch thread), the tiny OneVision model:

1. A mixed load: 16 clients in closed loops, half streaming, max_tokens 8, 16, ..., 256 (two clients
   each), image questions. Time to first token (streams: the first content chunk; non-streamed: the
   answer), p50/p99, and completion tokens per second. The engine against
   the replica before it (benchmarks/_request_batching.py: batches formed between batches, one stream at a
   time under the model lock).
2. A multi-turn chat that re-sends one image (a 448x336 PNG: AnyRes tiles) on each of 4 turns: TTFT of
   turns 2-4 on the engine, with the feature cache (turn 1 encodes, 2-4 hit) against without it (each
   turn's image differs from the last by one pixel: the same shapes and work, never a hit).
3. A long conversation, as a chat client sends it (the whole history every turn): 8 turns, image A in
   turn 1 and image B in turn 5, each user turn a passage of about 400 tokens, so the last turn's prompt
   holds more than 3,000 tokens. TTFT per turn with prefix reuse against without it (each turn opens with
   a system line of its own, of the same length: no prefix is shared, every turn prefills its history).
4. Routing (full runs only: two more apps' start-up does not fit --quick's 45 s): two replicas behind the
   conversation router (serve/routing.py) against two behind Serve's default (power of two choices), 8
   concurrent 4-turn chats about an image each, the whole history sent: the share of turns 2+ that reused
   the whole previous prompt (the replica's prefix cache), and their TTFT p50.

    python benchmarks/serve.py [--quick]    (--quick: 1 s of mixed load per mode, 1 chat each)

The mixed load also gives inter-token latency (the gaps between a stream's content chunks) and goodput:
requests per second that met both SLOs, TTFT <= 1 s and mean inter-token latency <= 100 ms (vLLM's
serving benchmark reports the same two). The last line is the p99 TTFT ratio under the mixed load
(request / iteration).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import itertools
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The tiny LM with a vision tower whose share of prefill is OneVision's (about 40% at SigLIP-so400m over
# 10 tiles and Qwen2-0.5B): 45-50% here for a 448x336 image (31 tiles of 56 px), measured offline.
VISION = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4}
MAX_TOKENS = (8, 16, 32, 64, 128, 256, 8, 16, 32, 64, 128, 256, 8, 32, 128, 256)  # 16 clients


def image_url(size=(150, 100), dot: int = -1) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (245, 245, 245))
    ImageDraw.Draw(image).ellipse((30, 10, 110, 90), fill=(220, 30, 30))
    if dot >= 0:  # one pixel different: other bytes, the same work
        image.putpixel((dot % size[0], 0), (dot % 256, 0, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def mixed_load(client, tokenizer, seconds: float, url: str) -> dict:
    """16 closed-loop clients; TTFT (s) of the streamed requests (their first content chunk), latency of
    the non-streamed ones, and completion tokens per second over all."""
    ttfts, latencies, tokens, errors = [], [], [0], [0]
    gaps, good = [], [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    content = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "Describe the image."},
    ]

    def worker(k: int):
        stream = k % 2 == 1
        while time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                out = client.chat.completions.create(
                    model="llava-ray",
                    messages=[{"role": "user", "content": content}],
                    max_tokens=MAX_TOKENS[k],
                    stream=stream,
                )
                if stream:
                    first, text, arrivals = None, "", []
                    for chunk in out:
                        piece = chunk.choices[0].delta.content if chunk.choices else None
                        if piece:
                            arrivals.append(time.perf_counter())
                        if piece and first is None:
                            first = time.perf_counter() - start
                        text += piece or ""
                    count = len(tokenizer.encode(text, add_special_tokens=False))
                    between = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
                else:
                    count = out.usage.completion_tokens
            except Exception:  # counted, and reported
                with lock:
                    errors[0] += 1
                continue
            with lock:
                if stream:
                    ttfts.append(first if first is not None else time.perf_counter() - start)
                    gaps.extend(between)
                    itl = statistics.mean(between) if between else 0.0
                    good[0] += ttfts[-1] <= SLO_TTFT_S and itl <= SLO_ITL_S
                else:
                    latencies.append(time.perf_counter() - start)
                tokens[0] += count

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(MAX_TOKENS)) as pool:
        for f in [pool.submit(worker, k) for k in range(len(MAX_TOKENS))]:
            f.result()
    elapsed = time.monotonic() - start
    return {
        "p50": percentile(ttfts, 0.5),
        "p99": percentile(ttfts, 0.99),
        "tok_s": tokens[0] / elapsed,
        "latency_p50": percentile(latencies, 0.5),
        "n": len(ttfts) + len(latencies),
        "itl_p50": percentile(gaps, 0.5),
        "itl_p99": percentile(gaps, 0.99),
        "goodput": good[0] / elapsed,
        "errors": errors[0],
    }


FRESH = itertools.count()
SLO_TTFT_S, SLO_ITL_S = 1.0, 0.1
WORDS = "the a red blue circle square small large near far left right above below image shows one two".split()


def routed_chats(client) -> tuple[float, float, float]:
    """(hit rate, TTFT p50 s) of turns 2-4 of 8 concurrent 4-turn chats (see the module docstring), and
    the share of chats whose turns one replica answered (the x-llava-ray-replica header)."""

    def chat(k: int):
        image = {"type": "image_url", "image_url": {"url": image_url((448, 336), dot=next(FRESH))}}
        history = [{"role": "user", "content": [image, {"type": "text", "text": f"Chat {k}: describe it."}]}]
        out, before, replicas = [], None, set()
        for turn in range(4):
            start, first, text, usage = time.perf_counter(), None, "", None
            raw = client.chat.completions.with_raw_response.create(
                model="llava-ray",
                messages=history,
                max_tokens=16,
                stream=True,
                stream_options={"include_usage": True},
            )
            replicas.add(raw.headers.get("x-llava-ray-replica"))
            for chunk in raw.parse():
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece and first is None:
                    first = time.perf_counter() - start
                text += piece or ""
                usage = chunk.usage or usage
            if turn:
                hit = usage.prompt_tokens_details.cached_tokens >= before
                out.append((hit, first if first is not None else time.perf_counter() - start))
            before = usage.prompt_tokens
            history += [
                {"role": "assistant", "content": text or "ok"},
                {"role": "user", "content": f"And then, turn {turn + 2}?"},
            ]
        return out, len(replicas) == 1

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        chats = list(pool.map(chat, range(8)))
    turns = [t for chat_turns, _ in chats for t in chat_turns]
    kept = sum(one for _, one in chats) / len(chats)
    return sum(h for h, _ in turns) / len(turns), statistics.median(t for _, t in turns), kept


def long_chat(client, reuse: bool, turns: int = 8) -> list[tuple[float, int, int]]:
    """(TTFT s, prompt tokens, cached tokens) of each turn of one conversation that re-sends its whole
    history; without ``reuse`` each turn opens with a system line of its own (the same length)."""
    import random

    rng = random.Random(next(FRESH))
    images = [image_url((448, 336), dot=next(FRESH)), image_url((336, 448), dot=next(FRESH))]
    history: list[dict] = []
    out = []
    for turn in range(turns):
        passage = " ".join(rng.choice(WORDS) for _ in range(200))
        parts = [{"type": "text", "text": f"Turn {turn}: {passage}"}]
        if turn in (0, 4):
            parts.insert(0, {"type": "image_url", "image_url": {"url": images[turn // 4]}})
        history.append({"role": "user", "content": parts})
        system = [] if reuse else [{"role": "system", "content": f"Session {next(FRESH):08d}."}]
        start = time.perf_counter()
        first, text, usage = None, "", None
        for chunk in client.chat.completions.create(
            model="llava-ray",
            messages=system + history,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        ):
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece and first is None:
                first = time.perf_counter() - start
            text += piece or ""
            usage = chunk.usage or usage
        ttft = first if first is not None else time.perf_counter() - start
        out.append((ttft, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens))
        history.append({"role": "assistant", "content": text or "ok"})
    return out


def chat_ttfts(client, chats: int, cached: bool, text_only: bool = False) -> list[float]:
    """TTFT (first content chunk, streamed) of turns 2-4 of ``chats`` 4-turn chats about one image. With
    the cache: each chat re-sends its own image (turn 1 encodes it); without: every turn's image is new;
    ``text_only``: no image at all (the floor the cache cannot go below)."""
    out = []
    for _ in range(chats):
        chat_image = image_url((448, 336), dot=next(FRESH))
        history = []
        for turn in range(4):
            url = chat_image if cached else image_url((448, 336), dot=next(FRESH))
            parts = [{"type": "image_url", "image_url": {"url": url}}] if not text_only else []
            history.append(
                {"role": "user", "content": [*parts, {"type": "text", "text": f"Question {turn}?"}]}
            )
            start = time.perf_counter()
            first, text = None, ""
            for chunk in client.chat.completions.create(
                model="llava-ray", messages=history[-1:], max_tokens=8, stream=True
            ):
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece and first is None:
                    first = time.perf_counter() - start
                text += piece or ""
            if turn:
                out.append(first if first is not None else time.perf_counter() - start)
            history.append({"role": "assistant", "content": text or "ok"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs")
    args = parser.parse_args()
    began = time.monotonic()
    import openai
    import ray
    from ray import serve

    import benchmarks._request_batching as request_batching
    from benchmarks._common import final_line, machine, scratch
    from benchmarks._request_batching import RequestBatchedModel
    from components.model import ModelSpec, build_model, save_model
    from serve.app import ServeConfig, build_app
    from tests.conftest import free_port

    checkpoint = os.path.join(scratch("llava-ray-serve-bench-"), "hf")
    model, processor = build_model(ModelSpec(vision=VISION))
    save_model(model, processor, checkpoint)
    # the baseline replica's module is not installed: its class travels by value to the replica
    ray.cloudpickle.register_pickle_by_value(request_batching)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = dict(
        checkpoint=checkpoint,
        min_replicas=1,
        max_replicas=1,
        replica_cpus=1.0,
        engine={"max_batch_size": 16},
        max_ongoing_requests=64,
        limits={"max_new_tokens": 256},
    )
    serve.run_many(  # both apps start together: replica start-up is most of --quick's time
        [
            serve.RunTarget(
                build_app(ServeConfig(**common)),
                name="iteration",
                route_prefix="/iteration",
            ),
            serve.RunTarget(
                build_app(ServeConfig(**common), RequestBatchedModel), name="request", route_prefix="/request"
            ),
        ]
    )
    ready = time.monotonic()
    clients = {
        mode: openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/{mode}/v1", api_key="-", max_retries=0, timeout=120
        )
        for mode in ("iteration", "request")
    }
    seconds = 1 if args.quick else 30
    print(f"machine: {machine()}; tiny OneVision model, one replica per mode (1 CPU), real HTTP")
    print(f"mixed load: 16 clients (half streaming), max_tokens 8-256, {seconds} s per mode")
    print(
        f"{'mode':>10s} {'TTFT p50 ms':>11s} {'TTFT p99 ms':>11s} {'tokens/s':>9s} {'latency p50':>11s} "
        f"{'n':>5s} {'err':>4s} {'ITL p50':>7s} {'ITL p99':>7s} {'goodput':>7s}"
    )
    url = image_url()
    results = {}
    for mode in ("request", "iteration"):
        r = mixed_load(clients[mode], processor.tokenizer, seconds, url)
        results[mode] = r
        print(
            f"{mode:>10s} {r['p50'] * 1e3:11.0f} {r['p99'] * 1e3:11.0f} {r['tok_s']:9.1f} "
            f"{r['latency_p50'] * 1e3:11.0f} {r['n']:5d} {r['errors']:4d} {r['itl_p50'] * 1e3:7.1f} "
            f"{r['itl_p99'] * 1e3:7.1f} {r['goodput']:7.2f}"
        )
    print(
        f"(TTFT: streamed requests; latency: non-streamed; ITL ms; goodput: streamed requests/s with TTFT "
        f"<= {SLO_TTFT_S:g} s and mean ITL <= {SLO_ITL_S * 1e3:g} ms)"
    )
    chats = 1 if args.quick else 10
    print(f"multi-turn: {chats} chats x 4 turns re-sending a 448x336 PNG, TTFT of turns 2-4 (engine)")
    chat_ttfts(clients["iteration"], 1, cached=False)  # warm-up: the replica's first large image
    without = chat_ttfts(clients["iteration"], chats, cached=False)
    with_cache = chat_ttfts(clients["iteration"], chats, cached=True)
    floor = chat_ttfts(clients["iteration"], chats, cached=True, text_only=True)
    for name, values in (("no cache", without), ("cache", with_cache), ("text only", floor)):
        print(
            f"{name:>10s} TTFT p50 {statistics.median(values) * 1e3:7.1f} ms  p99 "
            f"{percentile(values, 0.99) * 1e3:7.1f} ms"
        )
    print(
        "long conversation: 8 turns, images in turns 1 and 5, ~400-token user turns, the whole history sent"
    )
    long_chat(clients["iteration"], reuse=True, turns=2)  # warm-up: both image sizes
    runs = 1 if args.quick else 3
    per_mode = {
        mode: [long_chat(clients["iteration"], reuse=mode) for _ in range(runs)] for mode in (False, True)
    }
    print(
        f"{'turn':>4s} {'prompt':>6s} {'cached':>6s} {'TTFT reuse ms':>13s} {'TTFT none ms':>12s}"
        f" {'ratio':>6s}"
    )
    turn_ratios = []
    for turn in range(8):
        none = statistics.median(run[turn][0] for run in per_mode[False])
        reuse = statistics.median(run[turn][0] for run in per_mode[True])
        _, prompt, cached = per_mode[True][0][turn]
        turn_ratios.append(none / reuse)
        print(
            f"{turn + 1:4d} {prompt:6d} {cached:6d} {reuse * 1e3:13.1f} {none * 1e3:12.1f}"
            f" {none / reuse:5.2f}x"
        )
    if not args.quick:
        serve.delete("request")
        serve.delete("iteration")
        pair = dict(common, min_replicas=2, max_replicas=2, replica_cpus=0.5)
        serve.run_many(
            [
                serve.RunTarget(build_app(ServeConfig(**pair)), name="routed", route_prefix="/routed"),
                serve.RunTarget(
                    build_app(ServeConfig(**pair, router="power_of_two")),
                    name="spread",
                    route_prefix="/spread",
                ),
            ]
        )
        print("routing: 2 replicas (0.5 CPU each), 8 concurrent 4-turn chats, the whole history sent")
        for mode, label in (("spread", "Serve's default"), ("routed", "conversation")):
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/{mode}/v1", api_key="-", max_retries=0, timeout=120
            )
            rate, ttft, kept = routed_chats(client)
            print(
                f"{label:>16s} router: turns 2+ reusing their history {rate:6.1%}, "
                f"TTFT p50 {ttft * 1e3:6.1f} ms, chats on one replica {kept:6.1%}"
            )
    print(f"measured in {time.monotonic() - began:.0f} s (of which Serve start-up {ready - began:.0f} s)")
    ray.shutdown()  # no graceful drain of the replicas: the measurements are done
    throughput = results["iteration"]["tok_s"] / results["request"]["tok_s"]
    cache_ratio = statistics.median(without) / statistics.median(with_cache)
    media = (statistics.median(without) - statistics.median(floor)) / max(
        1e-4, statistics.median(with_cache) - statistics.median(floor)
    )
    print(f"throughput (iteration / request): {throughput:.2f}x (target >= 1x)")
    print(
        f"multi-turn TTFT p50 (no cache / cache): {cache_ratio:.2f}x (target 2x); above the text-only floor "
        f"(HTTP, Serve's two hops, the prompt's own prefill): {media:.2f}x"
    )
    print(f"long conversation, turn 8 TTFT (no reuse / reuse): {turn_ratios[-1]:.2f}x (target 3x)")
    print(
        final_line(
            "serve", results["request"]["p99"] / results["iteration"]["p99"], "3x p99 TTFT, mixed load"
        )
    )


if __name__ == "__main__":
    main()
