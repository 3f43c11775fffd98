"""Peak host memory per rank while a stage builds its model under ZeRO-3: whole on every rank (a plain
build, then DeepSpeed partitions it) against our partitioned build (``components.model.partitioned_build``:
transformers' zero.Init path, each rank allocating only its partition), side by side in one run. Two
ranks (gloo, CPU), each in its own process; a rank's figure is its peak resident memory (ru_maxrss)
during the build and load, less its resident memory just before, i.e. what the model itself costs. Both
a random build from configs (Stage-1's base) and a load of a saved export (every later stage's start).

The LLM is Qwen2-0.5B-shaped with fewer layers (``--layers``; --quick: 4 layers, an 8,192 vocabulary), so
the model is large enough for its bytes to stand out of the interpreter's own; per-parameter figures
extrapolate in docs/SCALING.md.

    python benchmarks/zero3_build.py [--quick] [--layers N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks._common import final_line, machine, scratch  # noqa: E402

WORLD = 2


def _spec(layers: int, vocab: int):
    from benchmarks.gpu_step import QWEN2_0_5B
    from components.model import TINY_VISION, ModelSpec

    return ModelSpec(
        vision=dict(TINY_VISION), llm={**QWEN2_0_5B, "num_hidden_layers": layers, "vocab_size": vocab}
    )


def _ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": WORLD,
        "bf16": {"enabled": False},
        "zero_optimization": {"stage": 3},
    }


def _rss_kib() -> tuple[int, int]:
    """(anonymous, total) resident memory in KiB: RssAnon, and VmRSS (which adds mapped file pages)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["RssAnon"].split()[0]), int(fields["VmRSS"].split()[0])


class PeakRSS:
    """The largest anonymous and total resident memory seen while the block runs (sampled every 2 ms in a
    thread), less what was resident just before it, in MiB. Anonymous memory is what the process itself
    allocated; the total adds the pages of memory-mapped files (a safetensors checkpoint being loaded)."""

    def __enter__(self):
        import threading

        self.before = _rss_kib()
        self.peak = list(self.before)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.002):
            self._update()

    def _update(self) -> None:
        now = _rss_kib()
        self.peak = [max(a, b) for a, b in zip(self.peak, now, strict=True)]

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self._update()
        self.mib = (self.peak[0] - self.before[0]) / 1024
        self.total_mib = (self.peak[1] - self.before[1]) / 1024


def _trim() -> None:
    """Give freed memory back to the OS, so the next measurement starts from the resident baseline."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def rank_main(rank: int, port: int, layers: int, vocab: int, export: str) -> None:
    """One rank: import everything, then build (or load) whole, then partitioned, each measured by its own
    peak above the resident memory just before it."""
    import torch
    import torch.distributed as dist

    from components.model import build_model, load_model, partitioned_build, save_model
    from pipelines.train.local import join_local_group

    torch.set_num_threads(1)
    join_local_group(rank, WORLD, port)
    import deepspeed  # noqa: F401 (imported before the measurement starts)

    spec = _spec(layers, vocab)
    out = {}
    for what in ("build", "load"):  # the build's rank 0 saves the export the load reads
        out[what] = {}
        for way in ("whole", "partitioned"):
            _trim()
            start = time.perf_counter()
            with PeakRSS() as rss, partitioned_build(_ds_config() if way == "partitioned" else None):
                model, processor = load_model(export) if what == "load" else build_model(spec)
            seconds = time.perf_counter() - start
            held = sum(p.ds_tensor.numel() if hasattr(p, "ds_id") else p.numel() for p in model.parameters())
            params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
            out[what][way] = {
                "peak_mib": rss.mib,
                "total_mib": rss.total_mib,
                "held_params": held,
                "params": params,
                "seconds": seconds,
            }
            if what == "build" and way == "whole" and rank == 0:
                save_model(model, processor, export)  # not measured
            del model
            dist.barrier()
    print(json.dumps(out), flush=True)
    dist.destroy_process_group()


def run_ranks(layers: int, vocab: int, export: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--rank",
                str(r),
                "--port",
                str(port),
                "--layers",
                str(layers),
                "--vocab",
                str(vocab),
                "--export",
                export,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        )
        for r in range(WORLD)
    ]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=600)
        if p.returncode:
            raise SystemExit(f"zero3_build: a rank exited {p.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--export", default="")
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args.rank, args.port, args.layers, args.vocab, args.export)
        return
    layers, vocab = (4, 8192) if args.quick else (args.layers, args.vocab)
    export = os.path.join(scratch("zero3-build-"), "hf")  # the build's rank 0 saves it; the load reads it
    print(
        f"machine: {machine()}; {WORLD} ranks (gloo); a Qwen2-0.5B-shaped LLM with {layers} layers and a "
        f"{vocab:,} vocabulary beside the tiny SigLIP"
    )
    ranks = run_ranks(layers, vocab, export)
    params = ranks[0]["build"]["whole"]["params"]
    print(f"model: {params / 1e6:.1f} M parameters ({params * 4 / 2**20:.0f} MiB in fp32)")
    print(
        "| start | build | peak anonymous MiB per rank | peak total MiB (with mapped files) | parameters "
        "held "
        "per rank | seconds |\n|---|---|---|---|---|---|"
    )
    ratios = []
    for what in ("build", "load"):
        peaks = {}
        for way in ("whole", "partitioned"):
            peaks[way] = sorted(r[what][way]["peak_mib"] for r in ranks)[WORLD // 2]
            first = ranks[0][what][way]
            total = sorted(r[what][way]["total_mib"] for r in ranks)[WORLD // 2]
            print(
                f"| {what} | {way} | {peaks[way]:.0f} | {total:.0f} | {first['held_params'] / 1e6:.1f} M of "
                f"{first['params'] / 1e6:.1f} M | {max(r[what][way]['seconds'] for r in ranks):.1f} |"
            )
        ratios.append(peaks["whole"] / max(peaks["partitioned"], 1.0))
    print(
        f"whole / partitioned peak anonymous memory per rank: build {ratios[0]:.2f}x, load {ratios[1]:.2f}x "
        "(a whole load keeps the weights as the mapped file's pages)"
    )
    # the line: the build (what a rank allocates for the model); a load's cost is mostly the mapped file
    print(final_line("zero3_build", ratios[0], f"{WORLD}x: 1/world of the model per rank"))


if __name__ == "__main__":
    main()
