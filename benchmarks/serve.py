"""Serving: requests/s and p50/p99 latency at concurrency 1, 4 and 8, with dynamic batching against
without, on the same replica configuration (one replica each), in one run; then a bounded load run.
Requests are image questions through real HTTP (the openai client) on 127.0.0.1.

    python benchmarks/serve.py [--quick]    (--quick: concurrency 8 only, 3 s per point)
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def image_url() -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (150, 100), (245, 245, 245))
    ImageDraw.Draw(image).ellipse((30, 10, 110, 90), fill=(220, 30, 30))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def load(client, concurrency: int, seconds: float, max_requests: int, url: str) -> dict:
    latencies, errors = [], 0
    deadline = time.monotonic() + seconds
    content = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "What color is the circle?"},
    ]

    def worker():
        nonlocal errors
        while time.monotonic() < deadline and len(latencies) + errors < max_requests:
            start = time.perf_counter()
            try:
                client.chat.completions.create(model="llava-ray", messages=[{"role": "user", "content": content}],
                                               max_tokens=16)  # fmt: skip
                latencies.append(time.perf_counter() - start)
            except Exception:  # counted, and reported
                errors += 1

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    elapsed = time.monotonic() - start
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
        "n": len(latencies),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs")
    args = parser.parse_args()
    import openai
    import ray
    from ray import serve

    from benchmarks._common import machine, scratch
    from components.model import ModelSpec, build_model, save_model
    from serve.app import ServeConfig, build_app
    from tests.conftest import free_port

    checkpoint = os.path.join(scratch("llava-ray-serve-bench-"), "hf")
    model, processor = build_model(ModelSpec())
    save_model(model, processor, checkpoint)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # batching as configured by default (max_batch_size 8, adaptive wait of at most 50 ms)
    common = dict(checkpoint=checkpoint, min_replicas=1, max_replicas=1, replica_cpus=1.0)
    serve.run_many(  # both apps start together: replica start-up is most of --quick's time
        [
            serve.RunTarget(
                build_app(ServeConfig(batching=True, **common)), name="batched", route_prefix="/batched"
            ),
            serve.RunTarget(
                build_app(ServeConfig(batching=False, **common)), name="single", route_prefix="/single"
            ),
        ]
    )
    url = image_url()
    seconds = 3 if args.quick else 20
    print(f"machine: {machine()}; tiny OneVision model, one replica (1 CPU), image question, 16 new tokens")
    print(
        f"{'concurrency':>11s} {'mode':>9s} {'req/s':>7s} {'p50 ms':>7s} {'p99 ms':>7s} {'n':>5s} {'err':>4s}"
    )
    results = {}
    for concurrency in (8,) if args.quick else (1, 4, 8):  # --quick: only the point the ratio is taken at
        for mode in ("single", "batched"):
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/{mode}/v1", api_key="-", max_retries=0, timeout=60
            )
            load(client, concurrency, 0.5 if args.quick else 1.5, 8, url)  # warm up
            r = load(client, concurrency, seconds, 10**6, url)
            results[(concurrency, mode)] = r
            print(f"{concurrency:11d} {mode:>9s} {r['rps']:7.1f} {r['p50'] * 1e3:7.0f} {r['p99'] * 1e3:7.0f} "
                  f"{r['n']:5d} {r['errors']:4d}")  # fmt: skip
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/batched/v1", api_key="-", max_retries=0, timeout=60
    )
    bounded = load(client, 8, 2 if args.quick else 30, 2000, url)
    print(f"bounded load (batched, concurrency 8): {bounded['n']} requests, {bounded['errors']} errors, "
          f"{bounded['rps']:.1f} req/s, p99 {bounded['p99'] * 1e3:.0f} ms")  # fmt: skip
    ray.shutdown()  # no graceful drain of the replicas: the measurements are done
    ratio = results[(8, "batched")]["rps"] / results[(8, "single")]["rps"]
    print(f"serve: {ratio:.2f}x (target 2x)")


if __name__ == "__main__":
    main()
