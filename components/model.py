"""The one place that builds a LLaVA model and its tokenizer, for training and for serving alike.

A ``ModelSpec`` names the vision tower, the LLM and the projector. Each of vision and llm is an
HF id, a local or s3:// path, or a dict (a tiny config, randomly initialised). OneVision and
Interleave build ``LlavaOnevisionForConditionalGeneration``; LLaVA and LLaVA-1.5 build
``LlavaForConditionalGeneration``. The exports are standard HF checkpoints (safetensors), except
LLaVA (1.0)'s linear projector, which HF has no class for: its export records
``projector_type: linear`` and loads through ``load_model`` here.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from components import storage
from components.anyres import AnyResConfig, grid_pinpoints
from components.conversation import IMAGE_PLACEHOLDER, TEMPLATES, VIDEO_PLACEHOLDER

log = logging.getLogger(__name__)

PARTS = ("vision_tower", "multi_modal_projector", "language_model")
SPECIAL_TOKENS = {
    "pad": "<pad>",
    "bos": "<s>",
    "eos": "</s>",
    "unk": "<unk>",
    "image": IMAGE_PLACEHOLDER,
    "video": VIDEO_PLACEHOLDER,
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
}

TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_LLM = {
    "hidden_size": 192,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}


@dataclass
class ModelSpec:
    """What to build. A stage after Stage-1 sets ``checkpoint`` to the previous stage's HF export."""

    arch: str = "llava_onevision"
    """llava_onevision (OneVision, Interleave) or llava (LLaVA, LLaVA-1.5)."""
    vision: str | dict = field(default_factory=lambda: dict(TINY_VISION))
    """HF id or path of a vision tower (SigLIP for OneVision, CLIP for LLaVA), or a tiny config dict."""
    llm: str | dict = field(default_factory=lambda: dict(TINY_LLM))
    """HF id or path of a causal LM with its tokenizer (Qwen-2, Vicuna), or a tiny config dict."""
    projector: str = "mlp2x_gelu"
    """mlp2x_gelu (LLaVA-1.5 and later) or linear (LLaVA)."""
    vision_feature_layer: int = -1
    """-1 for OneVision (HF's config); -2 for LLaVA and LLaVA-1.5 (the layer before the last)."""
    anyres: AnyResConfig = field(default_factory=lambda: AnyResConfig(tile_size=56))
    template: str = "chatml"
    checkpoint: str | None = None
    """A full LLaVA checkpoint (an HF export of ours, or a pretrained one); overrides vision/llm."""
    tokenizer_corpus: list[str] | None = None
    """Text to train the tiny tokenizer on (tiny llm only); the demo corpus by default."""
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.anyres, dict):
            self.anyres = AnyResConfig(**self.anyres)
        if self.arch not in ("llava_onevision", "llava"):
            raise ValueError(f"ModelSpec.arch: expected 'llava_onevision' or 'llava', found {self.arch!r}")
        if self.projector not in ("mlp2x_gelu", "linear"):
            raise ValueError(
                f"ModelSpec.projector: expected 'mlp2x_gelu' or 'linear', found {self.projector!r}"
            )
        if self.projector == "linear" and self.arch != "llava":
            raise ValueError("ModelSpec.projector: 'linear' is LLaVA (1.0)'s projector; use arch 'llava'")
        if self.template not in TEMPLATES:
            raise ValueError(
                f"ModelSpec.template: expected one of {sorted(TEMPLATES)}, found {self.template!r}"
            )


# ---- tokenizer -------------------------------------------------------------------------------


def build_tiny_tokenizer(corpus: list[str], vocab_size: int = 1024):
    """A byte-level BPE trained on ``corpus`` (deterministic), as a PreTrainedTokenizerFast with our specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    return PreTrainedTokenizerFast(
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


def _ensure_media_tokens(tokenizer) -> None:
    """Pretrained tokenizers get <image>/<video> (and the template's specials) added when missing."""
    missing = [
        t
        for t in SPECIAL_TOKENS.values()
        if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)
    ]
    missing = [t for t in missing if t not in ("<unk>", "<pad>", "<s>", "</s>")]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


# ---- model -----------------------------------------------------------------------------------


class LinearProjector(nn.Module):
    """LLaVA (1.0)'s projector: one linear layer from vision features to the LLM's embedding space."""

    def __init__(self, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.linear = nn.Linear(vision_hidden, text_hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


def _local(uri: str, tmp: str) -> str:
    """A local directory for a path or an s3:// URI (downloaded); an HF id is returned unchanged."""
    if storage.is_s3(uri):
        return storage.download_dir(uri, tmp)
    if uri.startswith("file://"):
        return uri[len("file://") :]
    return uri


def _vision_config(spec: ModelSpec):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = SiglipVisionConfig if spec.arch == "llava_onevision" else CLIPVisionConfig
    kwargs = dict(spec.vision)
    kwargs.setdefault("image_size", spec.anyres.tile_size)
    kwargs.setdefault("patch_size", spec.anyres.patch_size)
    return cls(**kwargs)


def _llm_config(spec: ModelSpec, vocab_size: int):
    from transformers import LlamaConfig, Qwen2Config

    cls = Qwen2Config if spec.arch == "llava_onevision" else LlamaConfig
    return cls(vocab_size=vocab_size, tie_word_embeddings=False, **spec.llm)


def _compose_config(spec: ModelSpec, vision_config, text_config, tokenizer):
    from transformers import LlavaConfig, LlavaOnevisionConfig

    common = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        vision_feature_layer=spec.vision_feature_layer,
    )
    if spec.arch == "llava_onevision":
        config = LlavaOnevisionConfig(
            **common,
            video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_PLACEHOLDER),
            vision_feature_select_strategy="full",
            image_grid_pinpoints=[list(p) for p in grid_pinpoints(spec.anyres)],
            vision_aspect_ratio=f"anyres_max_{spec.anyres.max_tiles}",
        )
    else:
        config = LlavaConfig(**common, vision_feature_select_strategy="default")
    config.llava_ray = {
        "projector_type": spec.projector,
        "template": spec.template,
        "anyres": asdict(spec.anyres),
    }
    return config


def _model_class(arch: str):
    from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    return (
        LlavaOnevisionForConditionalGeneration if arch == "llava_onevision" else LlavaForConditionalGeneration
    )


def _use_linear_projector(model) -> None:
    inner = model.model
    inner.multi_modal_projector = LinearProjector(
        model.config.vision_config.hidden_size, model.config.text_config.hidden_size
    )


def build_tokenizer(spec: ModelSpec):
    """The tokenizer a spec trains and serves with (the checkpoint's, the LLM's, or the tiny BPE)."""
    from transformers import AutoTokenizer

    if spec.checkpoint or not isinstance(spec.llm, dict):
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = AutoTokenizer.from_pretrained(_local(spec.checkpoint or spec.llm, tmp))
        _ensure_media_tokens(tokenizer)
    else:
        from components.demo_data import tokenizer_corpus

        tokenizer = build_tiny_tokenizer(spec.tokenizer_corpus or tokenizer_corpus())
    tokenizer.chat_template = chat_template(spec.template)
    return tokenizer


def build_model(spec: ModelSpec):
    """(model, tokenizer) for a spec: from a full checkpoint, or composed from vision + llm."""
    if spec.checkpoint:
        model, tokenizer = load_model(spec.checkpoint)
        tokenizer.chat_template = chat_template(spec.template)
        return model, tokenizer
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    tokenizer = build_tokenizer(spec)
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(spec.llm, dict):
            llm, text_config = None, _llm_config(spec, len(tokenizer))
        else:
            llm = AutoModelForCausalLM.from_pretrained(
                _local(spec.llm, os.path.join(tmp, "llm")), use_safetensors=True
            )
            text_config = llm.config
        if isinstance(spec.vision, dict):
            vision, vision_config = None, _vision_config(spec)
        else:
            vision = AutoModel.from_pretrained(
                _local(spec.vision, os.path.join(tmp, "vision")), use_safetensors=True
            )
            vision_config = getattr(vision.config, "vision_config", vision.config)
        config = _compose_config(spec, vision_config, text_config, tokenizer)
        model = _model_class(spec.arch)(config)
        if spec.projector == "linear":
            _use_linear_projector(model)
        if llm is not None:
            llm.resize_token_embeddings(len(tokenizer))
            model.model.language_model.load_state_dict(llm.model.state_dict())
            model.lm_head.load_state_dict(llm.lm_head.state_dict())
            model.config.text_config.vocab_size = len(tokenizer)
        if vision is not None:
            _load_vision(model.model.vision_tower, vision)
    return model, tokenizer


def _load_vision(tower: nn.Module, pretrained: nn.Module) -> None:
    """Copy a pretrained vision model (tower alone, or a full CLIP/SigLIP whose text half is ignored)."""
    wanted = tower.state_dict()
    state = {k: v for k, v in pretrained.state_dict().items() if k in wanted}
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ValueError(
            f"vision weights: expected keys like {missing[:3]}, found {list(pretrained.state_dict())[:3]}"
        )
    tower.load_state_dict(state, strict=True)


def _load_linear_projector(model, path: str) -> None:
    """HF has no linear-projector class: its two weights are read from the safetensors by name."""
    from safetensors import safe_open

    found = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for key in f.keys():
                    if "multi_modal_projector.linear." in key:
                        found[key.rsplit(".", 1)[-1]] = f.get_tensor(key)
    if set(found) != {"weight", "bias"}:
        raise ValueError(
            f"{path}: expected multi_modal_projector.linear weight and bias, found {sorted(found)}"
        )
    model.model.multi_modal_projector.linear.load_state_dict(found)


def chat_template(name: str) -> str:
    """A Jinja chat template equal to our Template, so HF users' apply_chat_template matches training."""
    t = TEMPLATES[name]

    def q(s: str) -> str:
        return json.dumps(s)

    user_pre, user_post = t.user_format.split("{text}")
    asst_pre, asst_post = t.assistant_format.split("{text}")
    prefix_pre, prefix_post = t.prefix_format.split("{system}")
    return (
        "{% set sys = namespace(text=" + q(t.system) + ") %}"
        "{% for m in messages %}{% if m['role'] == 'system' %}{% set sys.text = m['content'] %}{% endif %}{% endfor %}"
        + ("{{ bos_token }}" if t.add_bos else "")
        + "{{ "
        + q(prefix_pre)
        + " + sys.text + "
        + q(prefix_post)
        + " }}"
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %}{{ " + q(user_pre) + " + m['content'] + " + q(user_post) + " }}"
        "{% elif m['role'] == 'assistant' %}{{ "
        + q(asst_pre)
        + " + m['content'] + "
        + q(asst_post)
        + " + "
        + q(t.after_assistant)
        + " }}{% endif %}{% endfor %}"
    )


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
        out.append({"name": "+".join(group["parts"]) + suffix, "parts": group["parts"], "params": group["params"],
                    "lr": group_lr, "weight_decay": wd})  # fmt: skip
    return out


def group_of(groups: list[dict], part: str) -> dict | None:
    """The (decayed, if any) optimizer group that holds ``part``: where its LR is read from."""
    held = [g for g in groups if part in g.get("parts", ())]
    return next((g for g in held if not g["name"].endswith("_no_decay")), held[0] if held else None)


# ---- save / load -----------------------------------------------------------------------------


def save_model(model, tokenizer, uri: str) -> dict:
    """Save an HF checkpoint (safetensors, tokenizer, chat template) to a path or s3:// URI, manifest last."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        return storage.upload_dir(tmp, uri)


def load_model(uri: str, *, dtype: torch.dtype | None = None):
    """(model, tokenizer) from an HF checkpoint at a path, s3:// URI or HF id; weights via safetensors only."""
    from transformers import AutoConfig, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = _local(uri, tmp)
        config = AutoConfig.from_pretrained(path)
        extra = getattr(config, "llava_ray", None) or {}
        arch = "llava_onevision" if config.model_type == "llava_onevision" else "llava"
        cls = _model_class(arch)
        model = cls.from_pretrained(path, use_safetensors=True, dtype=dtype)
        if extra.get("projector_type") == "linear":
            _use_linear_projector(model)
            _load_linear_projector(model, path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        _ensure_media_tokens(tokenizer)
    return model, tokenizer


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class PromptSettings:
    """How a checkpoint is prompted: recorded in its config when it was built, read back by eval and serving."""

    arch: str
    template: str
    anyres: AnyResConfig


def prompt_settings(model) -> PromptSettings:
    extra = getattr(model.config, "llava_ray", None) or {}
    anyres = AnyResConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in extra.get("anyres", {}).items()}
    )
    arch = "llava_onevision" if model.config.model_type == "llava_onevision" else "llava"
    return PromptSettings(arch=arch, template=extra.get("template", "chatml"), anyres=anyres)
