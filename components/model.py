"""The one place that builds a LLaVA model and its processor, for training and for serving alike.

    model, processor = build_model(ModelSpec(arch="llava_onevision"))    # tiny, random, from configs
    model, processor = load_model("runs/demo/stage2_ov/hf")              # an export (path or s3://)

A ``ModelSpec`` names the architecture, the vision tower, the LLM and the projector. Each of vision and
llm is an HF id, a local or s3:// path, or a dict (a tiny config, randomly initialised); ``checkpoint``
is a whole LLaVA checkpoint (ours, or an llava-hf release). The architecture (components/architectures.py)
picks the transformers classes: LLaVA and LLaVA-1.5 build ``LlavaForConditionalGeneration``, LLaVA-1.5-HD
``LlavaNextForConditionalGeneration``, OneVision and Interleave ``LlavaOnevisionForConditionalGeneration``.
Every export is a plain HF checkpoint (safetensors, the processor files, generation_config.json with the
template's stop). LLaVA (1.0)'s single linear projector trains as one layer and is written in HF's
two-layer form, exactly: the linear layer, an identity activation, and an identity second layer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass, field

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

from components import storage
from components.anyres import AnyResConfig
from components.architectures import MODEL_TYPES, architecture
from components.conversation import DEFAULT_TEMPLATE, SPECIAL_TOKENS, TEMPLATES
from components.demo_data import tokenizer_corpus
from components.frozen import FrozenDict, freeze
from components.processor import (
    LlavaProcessor,
    ProcessorConfig,
    anyres_from_dict,
    ensure_media_tokens,
    local_dir,
)

log = logging.getLogger(__name__)

PARTS = ("vision_tower", "multi_modal_projector", "language_model")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "auto")


def attention(name: str) -> str:
    """The attention implementation to build with: ``auto`` is flash_attention_2 where flash-attn imports."""
    if name != "auto":
        return name
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


TINY_VISION = FrozenDict(
    {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
)
TINY_LLM = FrozenDict(
    {
        "hidden_size": 192,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
    }
)


@dataclass(frozen=True)
class ModelSpec:
    """What to build. A stage after Stage-1 sets ``checkpoint`` to the previous stage's HF export. Frozen
    all the way down: a tiny config dict becomes a FrozenDict, the corpus a tuple."""

    arch: str = "llava_onevision"
    """llava (LLaVA, LLaVA-1.5), llava_next (LLaVA-1.5-HD) or llava_onevision (OneVision, Interleave)."""
    vision: str | dict = TINY_VISION
    """HF id or path of a vision tower (SigLIP for OneVision, CLIP for LLaVA), or a tiny config dict."""
    llm: str | dict = TINY_LLM
    """HF id or path of a causal LM with its tokenizer (Qwen-2, Vicuna), or a tiny config dict."""
    projector: str = "mlp2x_gelu"
    """mlp2x_gelu (LLaVA-1.5 and later) or linear (LLaVA)."""
    vision_feature_layer: int = -1
    """The vision tower's hidden state the projector reads: -2 (the layer before the last) for LLaVA and
    LLaVA-1.5; -1 for OneVision, whose tower keeps only the first 26 of SigLIP's 27 layers."""
    vision_layers: int | None = None
    """Keep only the first N layers of a pretrained vision tower (OneVision: 26, as the release and the
    llava-hf conversions do); None: all of them."""
    anyres: AnyResConfig = field(default_factory=lambda: AnyResConfig(tile_size=56))
    template: str = DEFAULT_TEMPLATE
    """The conversational template (a stage may train with another, e.g. Stage-1's plain)."""
    checkpoint: str | None = None
    """A full LLaVA checkpoint (an HF export of ours, or an llava-hf release); overrides vision/llm."""
    tokenizer_corpus: tuple[str, ...] | None = None
    """Text to train the tiny tokenizer on (tiny llm only); the demo corpus by default."""
    attn_implementation: str = "sdpa"
    """sdpa, eager, flash_attention_2, or auto (flash_attention_2 when flash-attn is importable, else sdpa);
    recorded in the export's config."""

    def __post_init__(self) -> None:
        if isinstance(self.anyres, dict):
            object.__setattr__(self, "anyres", anyres_from_dict(self.anyres))
        for name in ("vision", "llm", "tokenizer_corpus"):
            object.__setattr__(self, name, freeze(getattr(self, name)))
        architecture(self.arch)
        if self.attn_implementation not in ATTENTION:
            raise ValueError(
                f"ModelSpec.attn_implementation: expected one of {list(ATTENTION)}, found "
                f"{self.attn_implementation!r}"
            )
        if self.projector not in ("mlp2x_gelu", "linear"):
            raise ValueError(
                f"ModelSpec.projector: expected 'mlp2x_gelu' or 'linear', found {self.projector!r}"
            )
        if self.projector == "linear" and self.arch != "llava":
            raise ValueError(
                "ModelSpec.projector: expected 'linear' only with arch 'llava' (LLaVA 1.0), found arch "
                f"{self.arch!r}"
            )
        if self.template not in TEMPLATES:
            raise ValueError(
                f"ModelSpec.template: expected one of {sorted(TEMPLATES)}, found {self.template!r}"
            )
        if self.vision_layers is not None and (
            not isinstance(self.vision_layers, int) or self.vision_layers < 1
        ):
            raise ValueError(
                f"ModelSpec.vision_layers: expected a positive int or None, found {self.vision_layers!r}"
            )


# ---- tokenizer -------------------------------------------------------------------------------


def build_tiny_tokenizer(corpus: list[str], vocab_size: int = 1024):
    """A byte-level BPE trained on ``corpus`` (deterministic), as a PreTrainedTokenizerFast with our
    specials."""

    specials = list(SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        extra_special_tokens={
            "image_token": SPECIAL_TOKENS["image"],
            "video_token": SPECIAL_TOKENS["video"],
            "im_start_token": SPECIAL_TOKENS["im_start"],
            "im_end_token": SPECIAL_TOKENS["im_end"],
        },
        model_max_length=TINY_LLM["max_position_embeddings"],
    )


# ---- model -----------------------------------------------------------------------------------


class LinearProjector(nn.Module):
    """LLaVA (1.0)'s projector: one linear layer from vision features to the LLM's embedding space."""

    def __init__(self, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.linear = nn.Linear(vision_hidden, text_hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


def _vision_config(spec: ModelSpec):
    cls = getattr(transformers, architecture(spec.arch).vision_config_class)
    kwargs = dict(spec.vision)
    kwargs.setdefault("image_size", spec.anyres.tile_size)
    kwargs.setdefault("patch_size", spec.anyres.patch_size)
    return cls(**kwargs)


def _llm_config(spec: ModelSpec, vocab_size: int):
    cls = getattr(transformers, architecture(spec.arch).llm_config_class)
    kwargs = {"tie_word_embeddings": False, **spec.llm}
    # a config may ask for a larger vocabulary than the tiny tokenizer's (a real-size shape, for benchmarks)
    kwargs["vocab_size"] = max(vocab_size, int(kwargs.get("vocab_size", 0)))
    return cls(**kwargs)


def build_tokenizer(spec: ModelSpec):
    """The tokenizer a spec trains and serves with (the checkpoint's, the LLM's, or the tiny BPE)."""
    if spec.checkpoint or not isinstance(spec.llm, dict):
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                local_dir(spec.checkpoint or spec.llm, tmp)
            )
        ensure_media_tokens(tokenizer)
        return tokenizer
    return build_tiny_tokenizer(spec.tokenizer_corpus or tokenizer_corpus())


def build_processor(spec: ModelSpec) -> LlavaProcessor:
    """The processor a spec's model is prompted with: its tokenizer, conversational template and AnyRes
    (a stage replaces what it trains with: template, grid, video sampling)."""
    if spec.checkpoint:
        return LlavaProcessor.from_pretrained(spec.checkpoint, default_template=spec.template)
    config = ProcessorConfig(arch=spec.arch, template=spec.template, anyres=spec.anyres)
    return LlavaProcessor(config, build_tokenizer(spec))


def build_model(spec: ModelSpec, seed: int = 0):
    """(model, processor) for a spec: from a full checkpoint, or composed from vision + llm (what is not
    loaded is initialised from ``seed``)."""
    if spec.checkpoint:
        return load_model(spec.checkpoint, default_template=spec.template)
    arch = architecture(spec.arch)
    torch.manual_seed(seed)
    processor = build_processor(spec)
    tokenizer = processor.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(spec.llm, dict):
            llm, text_config = None, _llm_config(spec, len(tokenizer))
        else:
            llm = transformers.AutoModelForCausalLM.from_pretrained(
                local_dir(spec.llm, os.path.join(tmp, "llm")), use_safetensors=True
            )
            text_config = llm.config
        if isinstance(spec.vision, dict):
            vision, vision_config = None, _vision_config(spec)
        else:
            vision = transformers.AutoModel.from_pretrained(
                local_dir(spec.vision, os.path.join(tmp, "vision")), use_safetensors=True
            )
            vision_config = getattr(vision.config, "vision_config", vision.config)
            if spec.vision_layers is not None:
                vision_config = vision_config.__class__(
                    **{**vision_config.to_dict(), "num_hidden_layers": spec.vision_layers}
                )
        config = arch.compose_config(
            vision_config, text_config, processor.image_token_id, processor.video_token_id, spec
        )
        config.llava_ray = {"projector_type": spec.projector, "attn_implementation": spec.attn_implementation}
        _set_attention(config, attention(spec.attn_implementation))
        if spec.projector == "linear":
            config.projector_hidden_act = "linear"  # HF's form of the linear projector: see save_model
        model = _model_class(arch.name)._from_config(config)  # straight into ZeRO-3 partitions under one
        if spec.projector == "linear":
            _use_linear_projector(model)
        if (llm is not None or vision is not None) and _partitioned(model.parameters()):
            raise ValueError(
                "ZeRO-3: expected a stage that starts from separate vision and LLM checkpoints (Stage-1) at "
                "zero_stage 2 or below, found zero_stage 3 (load the parts into a full checkpoint first)"
            )
        if llm is not None:
            llm.resize_token_embeddings(len(tokenizer))
            model.model.language_model.load_state_dict(llm.model.state_dict())
            model.lm_head.load_state_dict(llm.lm_head.state_dict())
            model.config.text_config.vocab_size = len(tokenizer)
        if vision is not None:
            _load_vision(model.model.vision_tower, vision)
    _set_generation_config(model, processor)
    return model, processor


@contextlib.contextmanager
def partitioned_build(ds_config: dict | None):
    """While active under a ZeRO-3 DeepSpeed config, transformers builds and loads models straight into
    each rank's partition (``zero.Init``, in the config's dtype: bf16 where the stage trains in bf16), so
    no rank materialises the whole model. Otherwise (ZeRO-0/1/2, no config) a plain build."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    # DeepSpeed's side of transformers: ZeRO-3 builds only
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    # what building needs (ZeRO settings, dtype): the batch sizes are checked against a world size that
    # DeepSpeed's comm does not know until deepspeed.initialize, so they stay out
    build = {k: ds_config[k] for k in ("zero_optimization", "bf16", "fp16") if k in ds_config}
    build["train_micro_batch_size_per_gpu"] = ds_config.get("train_micro_batch_size_per_gpu", 1)
    keep = HfDeepSpeedConfig(build)  # transformers holds a weak reference: keep it alive here
    try:
        yield
    finally:
        del keep
        unset_hf_deepspeed_config()


def _partitioned(params) -> bool:
    """Whether any of the parameters is a ZeRO-3 partition (DeepSpeed marks them with ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in params)


def _gathered(params):
    """The full values of ZeRO-3-partitioned parameters for the block (changes made on rank 0 are kept)."""
    params = list(params)
    if not _partitioned(params):
        return contextlib.nullcontext()
    import deepspeed  # ZeRO-3 only: it probes the accelerator and its ops at import

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def _set_attention(config, name: str) -> None:
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = name


CHECKPOINTABLE = ("language_model", "vision_tower")


def checkpointable(parts, where: str = "activation_checkpointing") -> tuple[str, ...]:
    """``parts`` as a tuple, when each is a part whose activations can be recomputed (CHECKPOINTABLE)."""
    unknown = set(parts) - set(CHECKPOINTABLE)
    if unknown:
        raise ValueError(f"{where}: expected a subset of {CHECKPOINTABLE}, found {sorted(unknown)}")
    return tuple(parts)


def enable_activation_checkpointing(model, parts) -> None:
    """Recompute the activations of ``parts`` (language_model, vision_tower) in the backward pass instead of
    keeping them: each layer's inputs are kept, the rest recomputed. Non-reentrant, so a frozen part whose
    inputs need no gradient still passes the trainable parts' gradients through (Stage-1's projector)."""
    for part in checkpointable(parts):
        module = getattr(model.model, part)
        module = getattr(module, "base_model", module) if hasattr(module, "peft_config") else module
        module = getattr(module, "model", module) if hasattr(module, "peft_config") else module
        module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def model_from_config(config, *, linear_projector: bool = False):
    """A randomly initialised model of a LLaVA config's class (the shape to load gathered weights into)."""
    model = _model_class(MODEL_TYPES[config.model_type])(config)
    if linear_projector:
        _use_linear_projector(model)
    return model


def _model_class(arch: str):
    return getattr(transformers, architecture(arch).model_class)


def _use_linear_projector(model) -> None:
    model.model.multi_modal_projector = LinearProjector(
        model.config.vision_config.hidden_size, model.config.text_config.hidden_size
    )


def _load_vision(tower: nn.Module, pretrained: nn.Module) -> None:
    """Copy a pretrained vision model (tower alone, or a full CLIP/SigLIP whose text half is ignored; layers
    past the tower's own, as OneVision drops SigLIP's last, are left out)."""
    wanted = tower.state_dict()
    state = {k: v for k, v in pretrained.state_dict().items() if k in wanted}
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ValueError(
            f"vision weights: expected keys like {missing[:3]}, found {list(pretrained.state_dict())[:3]}"
        )
    tower.load_state_dict(state, strict=True)


def _set_generation_config(model, processor: LlavaProcessor) -> None:
    """generation_config.json: the template's stop as eos and a pad id, so HF's plain generate stops."""
    for key, value in processor.generation_config().items():
        setattr(model.generation_config, key, value)


@contextlib.contextmanager
def _hf_projector(model):
    """While saving: LLaVA (1.0)'s linear projector in HF's two-layer form (linear_1 = ours, an identity
    activation, linear_2 = identity), so that LlavaForConditionalGeneration loads it with no missing or
    unexpected keys and computes exactly the same features."""
    inner = model.model
    linear = inner.multi_modal_projector
    if not isinstance(linear, LinearProjector):
        yield
        return
    # LLaVA's own modeling module (seconds to load): only a linear projector's export needs it
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    hf = LlavaMultiModalProjector(model.config).to(linear.linear.weight.dtype)
    with torch.no_grad():
        hf.linear_1.load_state_dict(linear.linear.state_dict())
        hf.linear_2.weight.copy_(torch.eye(hf.linear_2.weight.shape[0], dtype=hf.linear_2.weight.dtype))
        hf.linear_2.bias.zero_()
    inner.multi_modal_projector = hf
    try:
        yield
    finally:
        inner.multi_modal_projector = linear


def _from_hf_projector(model) -> None:
    """A loaded LLaVA (1.0) export back to its one trainable linear layer (its second layer must be the
    identity that ``_hf_projector`` wrote)."""
    hf = model.model.multi_modal_projector
    with _gathered(hf.parameters()):
        eye = torch.eye(hf.linear_2.weight.shape[0], dtype=hf.linear_2.weight.dtype)
        if not (torch.equal(hf.linear_2.weight, eye) and not hf.linear_2.bias.any()):
            raise ValueError(
                "multi_modal_projector.linear_2: expected the identity of a linear projector, found other "
                "weights"
            )
        linear = {k: v.detach().clone() for k, v in hf.linear_1.state_dict().items()}
    _use_linear_projector(model)
    model.model.multi_modal_projector.to(linear["weight"].dtype)
    model.model.multi_modal_projector.linear.load_state_dict(linear)


def set_trainable(model, parts: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Freeze everything, then unfreeze ``parts``; returns trainable parameter counts per part."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"trainable parts: expected a subset of {PARTS}, found {sorted(unknown)}")
    groups = part_modules(model)
    counts = {}
    for name, modules in groups.items():
        on = name in parts
        n = 0
        for module in modules:
            for p in module.parameters() if isinstance(module, nn.Module) else [module]:
                p.requires_grad_(on)
                n += p.numel() if on else 0
        counts[name] = n
    return counts


def part_modules(model) -> dict[str, list]:
    """The modules (and loose parameters) of each trainable part. image_newline goes with the projector."""
    inner = model.model
    projector = [inner.multi_modal_projector]
    if getattr(inner, "image_newline", None) is not None:
        projector.append(inner.image_newline)
    return {
        "vision_tower": [inner.vision_tower],
        "multi_modal_projector": projector,
        "language_model": [inner.language_model, model.lm_head],
    }


def param_groups(
    model,
    lr: float,
    *,
    vision_lr: float | None = None,
    projector_lr: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Optimizer groups: one per distinct (LR, weight decay), so parts that share an LR share a group, and
    biases and norms take no decay. Each group lists its ``parts``; its name joins them (``_no_decay`` for
    the undecayed half when decay is on). Few groups matter under ZeRO: every group is its own flat
    partition, reduced and gathered on its own at every step."""
    lrs = {"vision_tower": vision_lr or lr, "multi_modal_projector": projector_lr or lr, "language_model": lr}
    groups: dict[tuple[float, float], dict] = {}
    seen: set[int] = set()  # a tied lm_head is the embedding: one tensor, one group
    for part, modules in part_modules(model).items():
        for module in modules:
            named = (
                module.named_parameters() if isinstance(module, nn.Module) else [("image_newline", module)]
            )
            for name, p in named:
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                wd = 0.0 if p.ndim < 2 or "norm" in name.lower() else weight_decay
                group = groups.setdefault((lrs[part], wd), {"parts": [], "params": []})
                group["params"].append(p)
                if part not in group["parts"]:
                    group["parts"].append(part)
    out = []
    for (group_lr, wd), group in groups.items():
        suffix = "_no_decay" if weight_decay and not wd else ""
        out.append(
            {
                "name": "+".join(group["parts"]) + suffix,
                "parts": group["parts"],
                "params": group["params"],
                "lr": group_lr,
                "weight_decay": wd,
            }
        )
    return out


def group_of(groups: list[dict], part: str) -> dict | None:
    """The (decayed, if any) optimizer group that holds ``part``: where its LR is read from."""
    held = [g for g in groups if part in g.get("parts", ())]
    return next((g for g in held if not g["name"].endswith("_no_decay")), held[0] if held else None)


# ---- save / load -----------------------------------------------------------------------------


def save_model(model, processor: LlavaProcessor, uri: str) -> dict:
    """An HF checkpoint (safetensors, processor files, generation config) at a path or s3:// URI,
    manifest last."""
    _set_generation_config(model, processor)
    with tempfile.TemporaryDirectory() as tmp, _hf_projector(model):
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        return storage.upload_dir(tmp, uri)


def load_model(uri: str, *, dtype: torch.dtype | None = None, default_template: str | None = None):
    """(model, processor) from an HF checkpoint at a path, s3:// URI or HF id; weights via safetensors only.
    ``default_template`` is used only for a checkpoint without our processor file (an llava-hf release)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = local_dir(uri, tmp)
        config = transformers.AutoConfig.from_pretrained(path)
        if config.model_type not in MODEL_TYPES:
            raise ValueError(
                f"{uri}: model_type: expected one of {sorted(MODEL_TYPES)}, found {config.model_type!r}"
            )
        extra = getattr(config, "llava_ray", None) or {}
        model = _model_class(MODEL_TYPES[config.model_type]).from_pretrained(
            path,
            use_safetensors=True,
            dtype=dtype,
            attn_implementation=attention(extra.get("attn_implementation", "sdpa")),
        )
        if extra.get("projector_type") == "linear":
            _from_hf_projector(model)
        processor = LlavaProcessor.from_pretrained(path, default_template=default_template)
    return model, processor


def max_positions(uri: str) -> int:
    """The LLM's max_position_embeddings of a checkpoint (the most tokens it attends to), from its config
    alone."""
    with tempfile.TemporaryDirectory() as tmp:
        path = local_dir(uri, tmp) if not storage.is_s3(uri) else _config_only(uri, tmp)
        config = transformers.AutoConfig.from_pretrained(path)
    return int(config.text_config.max_position_embeddings)


def _config_only(uri: str, tmp: str) -> str:
    storage.write_bytes(
        os.path.join(tmp, "config.json"), storage.read_bytes(storage.join(uri, "config.json"))
    )
    return tmp


def torch_threads(cpus: float) -> int:
    """Torch's intra-op threads for a process given ``cpus`` CPUs (a worker, a replica): at least one."""
    return max(1, int(cpus))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
