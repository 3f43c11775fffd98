"""Recipes: a curriculum as data. A stage is config, not code; two stages differ only in their YAML.

A recipe file (pipelines/recipes/NAME.yaml) has a base (``model``, ``stages``) and ``profiles``
(``tiny`` for the demo and tests, ``full`` with the papers' numbers) that are deep-merged over it.
``${demo}`` in a path is the demo data directory; ``${data_root}`` the profile's data root.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields

import yaml

from components import storage
from components.anyres import AnyResConfig
from components.evaluation import ANSWER_TOKENS
from components.frozen import FrozenDict, freeze
from components.model import PARTS, TINY_LLM, TINY_VISION, ModelSpec, checkpointable
from components.processor import ProcessorConfig, VideoSampling

RECIPES_DIR = os.path.join(os.path.dirname(__file__), "recipes")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_SPREAD")
DATA_MODES = ("auto", "memory", "stream")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA on the LLM (merged into the export)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not (isinstance(self.r, int) and self.r >= 1 and self.alpha > 0 and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"lora: expected r >= 1, alpha > 0, 0 <= dropout < 1, found {self!r}")


@dataclass(frozen=True)
class EvalSpec:
    """The held-out split evaluated after every stage."""

    manifest: str | None = None
    """A JSONL with ``task`` and ``answer`` fields (and ``probe_answer`` for the reversed-order probes)."""
    max_new_tokens: int = ANSWER_TOKENS


@dataclass(frozen=True)
class StageSpec:
    """One stage of a curriculum."""

    name: str
    template: str
    """plain (Stage-1), vicuna_v0, vicuna_v1 or chatml."""
    data: dict
    """A mixture: {datasets: [{json_path|parquet_path, sampling_strategy}], seed}; paths under data_root
    (frozen: a FrozenDict of tuples)."""
    trainable: tuple[str, ...]
    """A subset of vision_tower, multi_modal_projector, language_model."""
    lr: float
    vision_lr: float | None = None
    """None: same as lr. OneVision: lr / 5."""
    projector_lr: float | None = None
    global_batch: int = 8
    """Samples per optimizer step across all workers; gradient accumulation makes up the rest."""
    micro_batch: int = 2
    """Samples per forward pass per worker."""
    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many optimizer steps (tiny profiles); None: the whole epochs."""
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    zero_stage: int = 2
    offload: bool = False
    max_length: int = 4096
    front_fraction: float = 0.0
    """Interleave's format mix: share of media samples with all images in front."""
    anyres: dict = field(default_factory=FrozenDict)
    """Overrides of the model's AnyResConfig for this stage (max_tiles: 5 for Stage-1.5, 10 for Stage-2)."""
    video: VideoSampling = VideoSampling()
    """How this stage samples video frames ({fps, max_frames} in YAML); its export records it."""
    lora: LoraSpec | None = None
    """LoRA on the LLM ({r, alpha, dropout, target_modules} in YAML); None: full fine-tuning."""
    checkpoint_every: int = 50
    group_by_modality: bool = True
    group_steps: int = 8
    """Optimizer steps whose rows are grouped together by modality and length (a megabatch): 2% padding
    against 26% naive on the demo mix (benchmarks/padding.py)."""
    activation_checkpointing: tuple[str, ...] = ()
    """Parts whose activations are recomputed in the backward pass (language_model, vision_tower): on in
    the full profiles (a 6,400-token Stage-2 sample keeps every layer's activations otherwise), off in the
    tiny ones."""
    data_mode: str = "auto"
    """memory (every worker reads the shards once and keeps its rows), stream (Ray Data every epoch), or
    auto (memory when the shards are under a tenth of the object store)."""
    stall_timeout_s: float = 1800.0
    """A worker that makes no progress (no step, no set-up phase ends) for this long ends the stage with an
    error naming what each worker was doing last, instead of hanging; a first DeepSpeed op build on a fresh
    node takes ~90 s of it, a large checkpoint's load or export some minutes."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoraSpec(**self.lora))
        if isinstance(self.video, dict):
            object.__setattr__(self, "video", VideoSampling(**self.video))
        for name in ("data", "trainable", "anyres"):
            object.__setattr__(self, name, freeze(getattr(self, name)))
        object.__setattr__(
            self,
            "activation_checkpointing",
            checkpointable(self.activation_checkpointing, f"stage {self.name}: activation_checkpointing"),
        )
        if self.data_mode not in DATA_MODES:
            raise ValueError(
                f"stage {self.name}: data_mode: expected one of {DATA_MODES}, found {self.data_mode!r}"
            )
        unknown = set(self.trainable) - set(PARTS)
        if unknown or not self.trainable:
            raise ValueError(
                f"stage {self.name}: trainable: expected a non-empty subset of {PARTS}, found "
                f"{self.trainable}"
            )
        if not self.stall_timeout_s > 0:
            raise ValueError(
                f"stage {self.name}: stall_timeout_s: expected > 0, found {self.stall_timeout_s}"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"stage {self.name}: zero_stage: expected 0-3, found {self.zero_stage}")
        if self.lr <= 0 or self.global_batch < 1 or self.micro_batch < 1:
            raise ValueError(
                f"stage {self.name}: expected lr > 0 and batches >= 1, found {self.lr}, {self.global_batch}, "
                f"{self.micro_batch}"
            )
        if not isinstance(self.data, dict) or not self.data.get("datasets"):
            raise ValueError(
                f"stage {self.name}: data: expected a mixture with datasets, found {self.data!r}"
            )

    def anyres_config(self, base: AnyResConfig) -> AnyResConfig:
        return AnyResConfig(**{**base.__dict__, **self.anyres})

    def processor_config(self, model: ModelSpec) -> ProcessorConfig:
        """The processor this stage trains with: its template, its AnyRes grid and its video sampling. The
        stage's export records the same, with the model's conversational template."""
        return ProcessorConfig(
            arch=model.arch,
            template=self.template,
            anyres=self.anyres_config(model.anyres),
            video=self.video,
        )


class RecipeError(ValueError):
    """A recipe, profile or stage that does not exist: the message names what was asked and what there is."""


@dataclass(frozen=True)
class Recipe:
    """A curriculum: the model, its stages in order, and where and how wide they train. Every later form
    (a stage's plan, its DeepSpeed config, its processor) is derived from these fields, never copied."""

    name: str
    model: ModelSpec
    stages: tuple[StageSpec, ...]
    profile: str
    data_root: str = "."
    workers: int | tuple[int, int] = 2
    """Training workers: a number, or a range ``[min, max]`` (elastic: the stage goes on with the workers
    that fit when a node is lost, and grows back when one arrives; the global batch is held at every size)."""
    worker_resources: dict = field(default_factory=dict)
    """Ray resources each training worker needs beside its CPUs (and GPU): a custom resource that counts a
    node's training slots, say."""
    resize_check_s: float = 60.0
    """Elastic stages: how often the ranks look for room to grow the worker group (room found: a
    checkpoint, then the next attempt larger)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    """CPUs per training worker; the tiny profiles use 0.5 so that Ray Data keeps a CPU to feed them."""
    placement: str = "PACK"
    """Ray's placement strategy for the training workers: PACK (fewest nodes: NVLink, one node's disk
    cache), SPREAD (across nodes, soft) or STRICT_SPREAD (one per node, or wait)."""
    eval: EvalSpec = field(default_factory=EvalSpec)
    """The held-out split for post-stage evaluation."""
    seed: int = 0
    """The run's one seed: the model's initialisation (what no checkpoint gives), each stage's data order,
    and the mixtures' sampling (a dataset's own ``seed:`` in a mixture fixes that dataset's draw instead)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        workers = self.workers
        if isinstance(workers, (list, tuple)):
            workers = tuple(workers)
            if len(workers) == 2 and workers[0] == workers[1]:
                workers = workers[0]
            object.__setattr__(self, "workers", workers)
        sizes = workers if isinstance(workers, tuple) else (workers,)
        if (
            len(sizes) not in (1, 2)
            or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in sizes)
            or sizes[0] > sizes[-1]
        ):
            raise RecipeError(
                f"workers: expected a positive int or a range [min, max], found {self.workers!r}"
            )
        object.__setattr__(self, "worker_resources", freeze(dict(self.worker_resources)))
        if not isinstance(self.resize_check_s, (int, float)) or not self.resize_check_s > 0:
            raise RecipeError(f"resize_check_s: expected a positive number, found {self.resize_check_s!r}")
        if not isinstance(self.cpus_per_worker, (int, float)) or not self.cpus_per_worker > 0:
            raise RecipeError(f"cpus_per_worker: expected a positive number, found {self.cpus_per_worker!r}")
        object.__setattr__(self, "cpus_per_worker", float(self.cpus_per_worker))
        if not isinstance(self.use_gpu, bool):
            raise RecipeError(f"use_gpu: expected true or false, found {self.use_gpu!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise RecipeError(f"seed: expected an int, found {self.seed!r}")
        if self.placement not in PLACEMENTS:
            raise RecipeError(f"placement: expected one of {PLACEMENTS}, found {self.placement!r}")

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, tuple) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, tuple) else self.workers

    @property
    def elastic(self) -> bool:
        return self.min_workers < self.max_workers

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise RecipeError(
            f"stage: expected a stage of recipe {self.name} ({', '.join(s.name for s in self.stages)}), "
            f"found {name!r}"
        )


def step_config(recipe: Recipe, stage: StageSpec):
    """What preprocessing needs for one stage of a recipe: the stage's processor, its token budget and mix."""
    from pipelines.steps import StepConfig

    return StepConfig(
        processor=stage.processor_config(recipe.model),
        model=recipe.model,
        max_length=stage.max_length,
        front_fraction=stage.front_fraction,
        seed=recipe.seed,
    )


def ensure_demo_data(demo_dir: str, tile_size: int = 56) -> str:
    """Make the demo world once (idempotent): the tiny profiles read from it. One made by another version of
    the generator or another tile size is refused, not silently reused."""
    import tempfile

    from components.demo_data import DemoConfig, check_demo_world, make_demo_data

    if not storage.exists(storage.join(demo_dir, "eval.jsonl")):
        if storage.is_s3(demo_dir):  # made here, then uploaded: every node reads it from there
            with tempfile.TemporaryDirectory() as scratch:
                make_demo_data(scratch, DemoConfig(tile_size=tile_size))
                storage.upload_dir(scratch, demo_dir, manifest=False)
        else:
            make_demo_data(demo_dir, DemoConfig(tile_size=tile_size))
    check_demo_world(demo_dir, tile_size)
    return demo_dir


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = (
            _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        )
    return out


def _subst(value, mapping: dict):
    if isinstance(value, str):
        for k, v in mapping.items():
            value = value.replace("${" + k + "}", v)
        return value
    if isinstance(value, list):
        return [_subst(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: _subst(v, mapping) for k, v in value.items()}
    return value


def recipe_path(name: str) -> str:
    if os.path.exists(name):
        return name
    path = os.path.join(RECIPES_DIR, f"{name}.yaml")
    if not os.path.exists(path):
        available = sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml"))
        raise RecipeError(f"--recipe: expected one of {available} or a YAML path, found {name!r}")
    return path


def list_recipes() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml"))


def load_recipe(
    name: str, profile: str = "tiny", *, demo_dir: str = "demo_out/data", data_root: str | None = None
) -> Recipe:
    with open(recipe_path(name)) as f:
        raw = yaml.safe_load(f)
    profiles = raw.get("profiles", {})
    if profile not in profiles:
        raise RecipeError(
            f"--profile: expected a profile of recipe {raw.get('name')} {sorted(profiles)}, found {profile!r}"
        )
    merged = _merge({k: v for k, v in raw.items() if k != "profiles"}, profiles[profile])
    root = data_root or merged.get("data_root", ".")
    demo = storage.absolute(demo_dir)  # s3:// kept as it is
    merged = _subst(merged, {"demo": demo, "data_root": _subst(root, {"demo": demo})})
    model = dict(merged["model"])
    if model.get("vision") == "tiny":
        model["vision"] = TINY_VISION
    if model.get("llm") == "tiny":
        model["llm"] = TINY_LLM
    order = merged.get("stage_order") or list(merged["stages"])
    known = {f.name for f in fields(StageSpec)}
    stages = []
    for stage_name in order:
        body = merged["stages"][stage_name]
        extra = set(body) - known
        if extra:
            raise ValueError(f"recipe {merged['name']}, stage {stage_name}: unknown fields {sorted(extra)}")
        stages.append(StageSpec(name=stage_name, **body))
    placed = (
        "data_root",
        "workers",
        "worker_resources",
        "resize_check_s",
        "use_gpu",
        "cpus_per_worker",
        "placement",
        "seed",
    )
    given = {k: merged[k] for k in placed if k in merged}
    return Recipe(  # the dataclasses' defaults are the only defaults
        name=merged["name"],
        model=ModelSpec(**model),
        stages=stages,
        profile=profile,
        eval=EvalSpec(**merged.get("eval", {})),
        **given,
    )
