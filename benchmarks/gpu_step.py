"""The real-size training step on one GPU, without Ray: our stage worker's step (its DeepSpeed engine from
our own ``deepspeed_config``, ZeRO-2, bf16; its rows from our preprocessing and processor) beside a plain
loop (the same transformers model class and config, torch AdamW, the same batches), in one run.

Shapes (random weights from configs, nothing downloaded):
  0.5b   SigLIP-so400m/14 at 384 px (the 26 layers OneVision keeps) + Qwen2-0.5B
  7b-N   the same tower + a Qwen2-7B-shaped LLM with N layers (per-layer extrapolation to 28)
  quick  the tiny models on the CPU (a smoke test of this script: no MFU claim)
Rows are Stage-2-like (the OneVision recipe's full-profile processor): AnyRes up to 6x6 at 384 px, from
~2,200 to ~7,300 visual tokens an image, plus text; and 32-frame videos (H.264, decoded by our reader).

MFU follows docs/SCALING.md's FLOP model: 6 N_llm per token plus attention 12 L d S, and the vision tower
at 6 N_vision per patch it encodes plus its attention (every tile of every image, every frame); it is
also given without the vision tower, as lmms-engine reports it. Peak: the GPU's dense BF16 TFLOP/s
(989 for H100/H200 SXM, 312 for A100; ``--peak-tflops`` to override).

The plain loop keeps the weights in bf16 and steps torch AdamW on them (no fp32 master copy): the
cheapest honest loop, so the overhead it shows is at most what DeepSpeed's mixed precision costs.

    python benchmarks/gpu_step.py --quick                 # CPU smoke test, tiny shapes (< 45 s)
    python benchmarks/gpu_step.py --shapes 0.5b,7b-4      # on a GPU: the table, then the headline line
    python benchmarks/gpu_step.py --cpu-shapes 0.5b       # by hand, no GPU: one ZeRO-3 step at 2 ranks

``--cpu-shapes``: the real shapes through the stage worker on the CPU (fp32, gloo), ZeRO-3 across two
rank processes, one 384x768 image (AnyRes at 384-px tiles) on one rank and one 8-frame video on the
other. It reports each rank's peak resident memory beside the memory model below, and the visual tokens
beside components/anyres.py's counts. DeepSpeed's bucket sizes are set as transformers' Trainer sets
its "auto" values (from the LLM's hidden size): DeepSpeed's own defaults size buffers for a GPU (a
5e8-element reduce bucket is 2 GB in fp32), more than this machine's share per rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks._common import machine, scratch  # noqa: E402

SIGLIP_SO400M = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
}
QWEN2_0_5B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "tie_word_embeddings": True,
}
QWEN2_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
}
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    vision: dict
    llm: dict
    tile: int
    sizes: tuple[tuple[int, int], ...]
    """(height, width) of the images: their AnyRes grids span 1x2 .. 6x6."""
    video_size: int
    answer_words: int


def shape(name: str) -> Shape:
    from components.model import TINY_LLM, TINY_VISION

    big = ((384, 768), (768, 768), (768, 1152), (1152, 1152), (1536, 1536), (2304, 2304))
    if name == "quick":
        return Shape(
            "quick", dict(TINY_VISION), dict(TINY_LLM), 56, ((56, 112), (112, 112), (168, 336)), 56, 40
        )
    if name == "0.5b":
        return Shape(name, dict(SIGLIP_SO400M), dict(QWEN2_0_5B), 384, big, 384, 200)
    if name.startswith("7b-"):
        return Shape(
            name, dict(SIGLIP_SO400M), {**QWEN2_7B, "num_hidden_layers": int(name[3:])}, 384, big, 384, 200
        )
    raise SystemExit(f"--shapes: expected quick, 0.5b or 7b-N, found {name!r}")


# ---- data: a manifest of Stage-2-like samples, through our preprocessing --------------------------------


def make_manifest(root: str, s: Shape, images: int, videos: int) -> str:
    """Single-image samples over the shape's sizes and 32-frame videos, with long answers."""
    import random

    import numpy as np

    from components.demo_data import COLORS, color_change_frames, shape_image, write_video
    from components.demo_data import DemoConfig as Demo

    rng = random.Random(0)
    os.makedirs(os.path.join(root, "media"), exist_ok=True)
    words = "the shape in this picture is drawn with a single colour on a light background and it".split()
    records = []
    for i in range(images):
        height, width = s.sizes[i % len(s.sizes)]
        image = shape_image(rng, s.tile, rng.choice(list(COLORS)), "circle").resize((width, height))
        image.save(os.path.join(root, "media", f"im{i}.png"))
        answer = " ".join(rng.choice(words) for _ in range(s.answer_words))
        records.append(
            {
                "id": f"im{i}",
                "image": f"media/im{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image in detail."},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    demo = Demo(video_frames=32, video_size=s.video_size)
    for i in range(videos):
        frames = color_change_frames(rng, "red", "blue", "square", demo)
        write_video(os.path.join(root, "media", f"v{i}.mp4"), np.ascontiguousarray(frames), fps=1)
        answer = " ".join(rng.choice(words) for _ in range(s.answer_words))
        records.append(
            {
                "id": f"v{i}",
                "video": f"media/v{i}.mp4",
                "conversations": [
                    {"from": "human", "value": "<video>\nWhat happens in the video?"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    path = os.path.join(root, "stage2.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def stage_plan(
    s: Shape,
    root: str,
    manifest: str,
    *,
    gpu: bool,
    micro: int,
    steps: int,
    ckpt: bool,
    attn: str,
    workers: int = 1,
    zero_stage: int = 2,
):
    """The OneVision recipe's Stage-2 (full profile: its AnyRes grid and video sampling) at this shape,
    ZeRO-2 on one worker unless told, bf16 on the GPU: the plan our Ray Train workers would get."""
    from pipelines.layout import RunLayout
    from pipelines.preprocess import PreprocessConfig, preprocess
    from pipelines.recipes import load_recipe, step_config
    from pipelines.train.plan import plan_stage
    from pipelines.train.stage import data_stats

    recipe = load_recipe("llava_onevision", "full")
    anyres = dataclasses.replace(recipe.model.anyres, tile_size=s.tile)
    model = dataclasses.replace(
        recipe.model, vision=s.vision, llm=s.llm, anyres=anyres, vision_layers=None, attn_implementation=attn
    )
    recipe = dataclasses.replace(
        recipe, model=model, workers=workers, use_gpu=gpu, cpus_per_worker=8 if gpu else 1, data_root=root
    )
    stage = dataclasses.replace(
        recipe.stage("stage2_ov"),
        data={"datasets": [{"json_path": manifest}]},
        zero_stage=zero_stage,
        micro_batch=micro,
        global_batch=micro * workers,
        max_steps=steps,
        activation_checkpointing=("language_model", "vision_tower") if ckpt else (),
        max_length=16384,
        checkpoint_every=10**9,
    )
    layout = RunLayout(root, "bench").stage(stage.name)
    if not os.path.exists(layout.preprocess_summary):
        config = PreprocessConfig(manifest=stage.data, data_root=root, steps=step_config(recipe, stage))
        preprocess(config, layout, local=True)
    positions, modalities = data_stats(layout)
    return plan_stage(recipe, stage, layout, positions, has_video="video" in modalities, init_from=None)


# ---- FLOPs ----------------------------------------------------------------------------------------------


def step_flops(model, batch: dict, rows: list[dict]) -> tuple[float, float]:
    """(FLOPs with the vision tower, FLOPs of the LLM alone) of one forward+backward over ``rows``."""
    text, vision = model.config.text_config, model.config.vision_config
    n_llm = sum(p.numel() for p in model.model.language_model.parameters()) + (
        0 if text.tie_word_embeddings else model.lm_head.weight.numel()
    )
    n_vis = sum(p.numel() for p in model.model.vision_tower.parameters())
    llm = 0.0
    for r in rows:
        s = len(r["input_ids"])
        llm += 6 * n_llm * s + 12 * text.num_hidden_layers * text.hidden_size * s * s
    patches_per_tile = (vision.image_size // vision.patch_size) ** 2
    tiles = 0
    for key in ("pixel_values", "pixel_values_videos"):
        value = batch.get(key)
        if value is not None:
            tiles += value.shape[0] * (value.shape[1] if value.dim() == 5 else 1)
    patches = tiles * patches_per_tile
    vis = (
        6 * n_vis * patches + 12 * vision.num_hidden_layers * vision.hidden_size * patches * patches_per_tile
    )
    return llm + vis, llm


# ---- the two loops --------------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_ours(plan, steps: int, warmup: int) -> dict:
    """Our stage worker's seams: setup_model, setup_optimizer (DeepSpeed), setup_step, then train_step."""
    import torch

    from pipelines.train.local import LocalContext
    from pipelines.train.worker import StageWorker

    worker = StageWorker(plan, LocalContext(scratch("gpu-step-ckpt-")))
    model, processor = worker.setup_model()
    ds_model, optimizer = worker.setup_optimizer(model)
    worker.setup_step(ds_model, optimizer, processor, start_step=0)
    batches = list(worker.setup_data().epoch(0))[: warmup + steps]
    times, flops, llm_flops, tokens, samples = [], 0.0, 0.0, 0, 0
    if ds_model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i, micro_batches in enumerate(batches):
        _sync(ds_model.device)
        start = time.perf_counter()
        worker.train_step(micro_batches, i, 0.0, start)
        _sync(ds_model.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            for micro in micro_batches:
                f, fl = step_flops(model, worker.make_batch(micro), micro)
                flops, llm_flops = flops + f, llm_flops + fl
                tokens += sum(len(r["input_ids"]) for r in micro)
                samples += len(micro)
    peak = torch.cuda.max_memory_allocated() / 2**30 if ds_model.device.type == "cuda" else None
    if hasattr(ds_model, "destroy"):
        ds_model.destroy()  # DeepSpeed's hooks and buffers: the plain loop must not run beside them
    del ds_model, optimizer, model, worker
    _free()
    return _figures(times, flops, llm_flops, tokens, samples, peak, batches, processor, plan)


def run_plain(plan, steps: int, warmup: int) -> dict:
    """transformers' model of the same config (built the same way), torch AdamW, the same batches."""
    import torch

    from components.batching import to_device
    from components.model import build_model, enable_activation_checkpointing, param_groups, set_trainable
    from components.processor import LlavaProcessor
    from pipelines.train.data import InMemorySteps

    device = torch.device("cuda" if plan.recipe.use_gpu else "cpu")
    dtype = torch.bfloat16 if plan.recipe.use_gpu else torch.float32
    model, processor = build_model(plan.recipe.model, seed=plan.recipe.seed)
    processor = LlavaProcessor(plan.processor, processor.tokenizer)
    processor.arch.set_stage_config(model.config, processor.anyres)
    set_trainable(model, plan.stage.trainable)
    enable_activation_checkpointing(model, plan.stage.activation_checkpointing)
    model = model.to(device, dtype).train()
    stage = plan.stage
    optimizer = torch.optim.AdamW(
        param_groups(model, stage.lr, vision_lr=stage.vision_lr), betas=(0.9, 0.999)
    )
    batches = list(InMemorySteps(plan, 0, 1).epoch(0))[: warmup + steps]
    times, flops, llm_flops, tokens, samples = [], 0.0, 0.0, 0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i, micro_batches in enumerate(batches):
        _sync(device)
        start = time.perf_counter()
        for micro in micro_batches:
            batch = to_device(processor.collate(micro), device, dtype)
            loss = model(**batch).loss / len(micro_batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            for micro in micro_batches:
                f, fl = step_flops(model, to_device(processor.collate(micro), device, dtype), micro)
                flops, llm_flops = flops + f, llm_flops + fl
                tokens += sum(len(r["input_ids"]) for r in micro)
                samples += len(micro)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del model, optimizer
    _free()
    return _figures(times, flops, llm_flops, tokens, samples, peak, batches, processor, plan)


def _figures(times, flops, llm_flops, tokens, samples, peak, batches, processor, plan) -> dict:
    seconds = sum(times)
    visual = [sum(r.get("media_tokens") or [0]) for b in batches for m in b for r in m]
    return {
        "step_s": statistics.median(times),
        "tokens_per_s": tokens / seconds,
        "samples_per_s": samples / seconds,
        "tflops": flops / seconds / 1e12,
        "tflops_llm": llm_flops / seconds / 1e12,
        "peak_gib": peak,
        "visual_tokens": (min(visual), max(visual)),
        "steps": len(times),
    }


# ---- the real shapes on the CPU: ZeRO-3 at two ranks (--cpu-shapes) -------------------------------------


def _auto_buckets(config: dict, hidden: int) -> dict:
    """transformers' Trainer "auto" ZeRO-3 buffer sizes, from the LLM's hidden size."""
    zero = dict(config["zero_optimization"])
    if zero.get("stage") == 3:
        zero.update(
            reduce_bucket_size=hidden * hidden,
            stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
            stage3_max_live_parameters=hidden * hidden * 10,
            stage3_max_reuse_distance=hidden * hidden * 10,
            sub_group_size=10**8,
        )
    return {**config, "zero_optimization": zero}


class _RankMemory:
    """This rank's resident memory sampled every 50 ms, its peak per phase written to a JSON file (the
    parent reads it even if the rank is killed for memory)."""

    def __init__(self, path: str, rank: int):
        import threading

        self.path, self.rank, self.phase, self.peaks, self.extra = path, rank, "start", {}, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.rss())
            self.write()

    def enter(self, phase: str) -> None:
        self.peaks[phase] = self.rss()
        self.phase = phase
        self.write()

    def write(self) -> None:
        record = {"rank": self.rank, "phase": self.phase, "peaks": self.peaks, **self.extra}
        with open(self.path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(self.path + ".tmp", self.path)


def _cpu_rank(rank: int, world: int, port: int, plan, out: str, steps: int) -> None:
    import torch
    import torch.distributed as dist

    import pipelines.train.worker as worker_module
    from pipelines.train.local import LocalContext, join_local_group
    from pipelines.train.worker import StageWorker

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    memory = _RankMemory(os.path.join(out, f"rank{rank}.json"), rank)
    join_local_group(rank, world, port)
    hidden = plan.recipe.model.llm["hidden_size"]
    ours = worker_module.deepspeed_config
    worker_module.deepspeed_config = lambda p, world=None: _auto_buckets(ours(p, world), hidden)
    worker = StageWorker(plan, LocalContext(scratch("cpu-shapes-ckpt-"), rank, world))
    memory.enter("build (ZeRO-3 partitioned)")
    start = time.perf_counter()
    model, processor = worker.setup_model()
    memory.extra["build_s"] = time.perf_counter() - start
    memory.enter("deepspeed.initialize")
    ds_model, optimizer = worker.setup_optimizer(model)
    worker.setup_step(ds_model, optimizer, processor, start_step=0)
    batches = list(worker.setup_data().epoch(0))[:steps]
    rows = [r for micro in batches[0] for r in micro]
    memory.extra["rows"] = [
        {
            "id": r["sample_id"],
            "modality": r["modality"],
            "tokens": len(r["input_ids"]),
            "media_tokens": list(r.get("media_tokens") or []),
            "sizes": r.get("image_sizes"),
            "frames": (r.get("pixel_shape") or [0])[0],
        }
        for r in rows
    ]
    memory.extra["padded"] = list(worker.make_batch(batches[0][0])["input_ids"].shape)
    times, losses = [], []
    for i, micro_batches in enumerate(batches):
        memory.enter(f"step {i + 1}")
        start = time.perf_counter()
        _, metrics = worker.train_step(micro_batches, i, 0.0, start)
        times.append(time.perf_counter() - start)
        losses.append(metrics["loss"])
        memory.extra.update(step_s=times, loss=losses)
    memory.enter("done")
    memory.stop.set()
    memory.write()
    dist.barrier()
    dist.destroy_process_group()


def memory_model(plan, world: int, tokens: int) -> dict:
    """docs/SCALING.md's per-rank model at fp32 (bytes per parameter: weights 4 + DeepSpeed's fp32 copy 4
    + gradients 4 + Adam 8, each 1/W under ZeRO-3), plus the checkpointed activations and the LM head's
    logits over the padded micro-batch (logits, their log-softmax and both gradients: 4 copies)."""
    from components.model import build_model

    model, _ = build_model(plan.recipe.model, seed=0)
    n = sum(p.numel() for p in model.parameters())
    text = model.config.text_config
    del model
    states = 20 * n / world
    activations = 4 * tokens * text.hidden_size * text.num_hidden_layers
    logits = 4 * 4 * tokens * text.vocab_size
    return {
        "parameters": n,
        "states": states,
        "activations": activations,
        "logits": logits,
        "vocab": text.vocab_size,
    }


def run_cpu_shapes(name: str, steps: int) -> None:
    """One short ZeRO-3 step of the real shapes at two rank processes on this machine; a watchdog ends
    the ranks when the machine's available memory falls under 0.7 GiB and reports how far they got."""
    import socket

    import torch.multiprocessing as mp

    from components.anyres import num_image_tokens

    world = 2
    s = shape(name)
    s = dataclasses.replace(s, sizes=s.sizes[:1])
    root = scratch(f"cpu-shapes-{name}-")
    manifest = make_manifest_small(root, s)
    plan = stage_plan(
        s,
        root,
        manifest,
        gpu=False,
        micro=1,
        steps=steps,
        ckpt=True,
        attn="sdpa",
        workers=world,
        zero_stage=3,
    )
    out = scratch("cpu-shapes-out-")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    print(f"machine: {machine()}; {name} shapes, ZeRO-3 at {world} ranks (gloo, fp32), {steps} step(s)")
    context = mp.get_context("spawn")
    procs = [context.Process(target=_cpu_rank, args=(r, world, port, plan, out, steps)) for r in range(world)]
    for p in procs:
        p.start()
    start, killed = time.perf_counter(), None
    while any(p.is_alive() for p in procs):
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
        if available < 0.7 * 2**30 and killed is None:
            killed = f"killed for memory after {time.perf_counter() - start:.0f} s"
            for p in procs:
                p.kill()
        time.sleep(0.2)
    records = []
    for r in range(world):
        path = os.path.join(out, f"rank{r}.json")
        records.append(json.load(open(path)) if os.path.exists(path) else {"rank": r, "peaks": {}})
    gib = 2**30
    print("\n| rank | phase | peak RSS GiB |\n|---|---|---|")
    for rec in records:
        for phase, peak in rec["peaks"].items():
            print(f"| {rec['rank']} | {phase} | {peak / gib:.2f} |")
    anyres = plan.processor.anyres
    from components.architectures import architecture

    arch = architecture(plan.processor.arch)
    print("\n| rank | row | modality | tokens | visual tokens | components/anyres.py | padded batch |")
    print("|---|---|---|---|---|---|---|")
    padded_tokens = 0
    for rec in records:
        for row in rec.get("rows", []):
            if row["modality"] == "video":
                expect = arch.video_tokens(row["frames"], anyres)
            else:
                expect = num_image_tokens(tuple(row["sizes"][0]), anyres, reduce=arch.reduces_grid)
            print(
                f"| {rec['rank']} | {row['id']} | {row['modality']} | {row['tokens']} | "
                f"{sum(row['media_tokens'])} | {expect} | {rec.get('padded')} |"
            )
        if rec.get("padded"):
            padded_tokens = max(padded_tokens, rec["padded"][0] * rec["padded"][1])
    model = memory_model(plan, world, padded_tokens)
    print(
        f"\nmemory model per rank (fp32): {model['parameters'] / 1e9:.2f} B parameters; states "
        f"{model['states'] / gib:.2f} GiB (20 B/param / {world}), checkpointed activations "
        f"{model['activations'] / gib:.2f} GiB, LM-head logits and their gradients "
        f"{model['logits'] / gib:.2f} GiB ({padded_tokens} padded tokens x "
        f"{model['vocab']})"
        f" = {(model['states'] + model['activations'] + model['logits']) / gib:.2f} GiB"
    )
    for rec in records:
        if rec.get("step_s"):
            print(f"rank {rec['rank']}: step s {rec['step_s']}, loss {rec['loss']}")
    peak = max((max(rec["peaks"].values(), default=0) for rec in records), default=0)
    print(f"gpu_step --cpu-shapes {name}: peak {peak / gib:.2f} GiB per rank, " + (killed or "done"))


def make_manifest_small(root: str, s: Shape) -> str:
    """One image (the shape's first size) and one 8-frame video: a rank's row each at world 2."""
    import random

    import numpy as np

    from components.demo_data import DemoConfig as Demo
    from components.demo_data import color_change_frames, shape_image, write_video

    rng = random.Random(0)
    os.makedirs(os.path.join(root, "media"), exist_ok=True)
    height, width = s.sizes[0]
    shape_image(rng, s.tile, "red", "circle").resize((width, height)).save(
        os.path.join(root, "media", "im0.png")
    )
    frames = color_change_frames(rng, "red", "blue", "square", Demo(video_frames=8, video_size=s.video_size))
    write_video(os.path.join(root, "media", "v0.mp4"), np.ascontiguousarray(frames), fps=1)
    answer = "the shape is drawn with a single colour on a light background " * 3
    records = [
        {
            "id": "im0",
            "image": "media/im0.png",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": answer},
            ],
        },
        {
            "id": "v0",
            "video": "media/v0.mp4",
            "conversations": [
                {"from": "human", "value": "<video>\nWhat happens in the video?"},
                {"from": "gpt", "value": answer},
            ],
        },
    ]
    path = os.path.join(root, "small.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


# ---- main -----------------------------------------------------------------------------------------------


def peak_tflops(override: float | None) -> float | None:
    import torch

    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _one(shape_name, root, manifest, args, gpu, ckpt, attn, peak) -> dict:
    import torch

    s = shape(shape_name)
    plan = stage_plan(
        s,
        root,
        manifest,
        gpu=gpu,
        micro=args.micro_batch,
        steps=args.warmup + args.steps,
        ckpt=ckpt,
        attn=attn,
    )
    row = {"shape": shape_name, "ckpt": ckpt, "attn": attn, "micro": args.micro_batch}
    for name, fn in (("ours", run_ours), ("plain", run_plain)):
        try:
            row[name] = fn(plan, args.steps, args.warmup)
        except torch.OutOfMemoryError:
            row[name] = None
        if gpu:
            torch.cuda.empty_cache()
    if row["ours"] and row["plain"]:
        row["overhead"] = row["ours"]["step_s"] / row["plain"]["step_s"] - 1
    for name in ("ours", "plain"):
        if row[name] and peak:
            row[name]["mfu"] = row[name]["tflops"] / peak
            row[name]["mfu_llm"] = row[name]["tflops_llm"] / peak
    return row


def _fmt(row: dict) -> str:
    o, p = row["ours"], row["plain"]
    head = f"| {row['shape']} | {'on' if row['ckpt'] else 'off'} | {row['attn']} | {row['micro']} |"
    if not o:
        return head + " OOM | | | | | | | |"
    mfu = f"{o['mfu']:.1%} / {o['mfu_llm']:.1%}" if "mfu" in o else "-"
    peak = f"{o['peak_gib']:.1f}" if o["peak_gib"] is not None else "-"
    plain = f"{p['step_s']:.3f} | {row['overhead']:+.1%}" if p else "OOM | -"
    vis = f"{o['visual_tokens'][0]}-{o['visual_tokens'][1]}"
    return (
        f"{head} {vis} | {o['step_s']:.3f} | {o['tokens_per_s']:,.0f} | {o['samples_per_s']:.2f} | {peak} | "
        f"{mfu} | {plain} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: a smoke test")
    parser.add_argument("--shapes", default="0.5b,7b-4")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--attention", default="sdpa,eager")
    parser.add_argument("--checkpointing", default="on,off")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument(
        "--cpu-shapes", default=None, help="0.5b: one ZeRO-3 step at two ranks on the CPU (by hand: slow)"
    )
    args = parser.parse_args()
    if args.cpu_shapes:
        run_cpu_shapes(args.cpu_shapes, steps=1)
        return
    import torch

    gpu = torch.cuda.is_available() and not args.quick
    if args.quick:
        args.shapes, args.steps, args.warmup, args.images, args.videos = "quick", 2, 1, 3, 1
    elif not gpu:
        raise SystemExit("gpu_step: expected a CUDA GPU for the real shapes (use --quick on the CPU)")
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    from pipelines.train.local import init_one_rank_group

    init_one_rank_group(gpu)
    peak = None if args.quick else peak_tflops(args.peak_tflops)
    print(
        f"machine: {machine()}; device: {torch.cuda.get_device_name(0) if gpu else 'cpu'}; "
        f"peak {peak or '-'} TFLOP/s bf16"
    )
    print(
        "| shape | ckpt | attn | micro | visual tokens | step s | tokens/s | samples/s | peak GiB | MFU (all "
        "/ LLM) "
        "| plain step s | overhead |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for shape_name in args.shapes.split(","):
        root = scratch(f"gpu-step-{shape_name}-")
        manifest = make_manifest(root, shape(shape_name), args.images, args.videos)
        for ckpt in [c == "on" for c in args.checkpointing.split(",")]:
            for attn in args.attention.split(","):
                rows.append(_one(shape_name, root, manifest, args, gpu, ckpt, attn, peak))
                print(_fmt(rows[-1]), flush=True)
    # the headline: the first shape's best configuration (what its recipe would run), named in the line
    done = [r for r in rows if r["ours"] and r["plain"] and r["shape"] == rows[0]["shape"]]
    head = max(done, key=lambda r: r["ours"]["tflops"], default=None)
    if head is None:
        print(
            "gpu_step: MFU -% (target 40%), overhead -% vs plain loop (every configuration ran out of memory)"
        )
        return
    mfu = f"{head['ours']['mfu']:.0%}" if "mfu" in head["ours"] else "- (CPU: no MFU claim)"
    print(
        f"gpu_step: MFU {mfu} (target 40%), overhead {head['overhead']:.1%} vs plain loop "
        f"[{head['shape']}, checkpointing {'on' if head['ckpt'] else 'off'}, {head['attn']}]"
    )


if __name__ == "__main__":
    main()
