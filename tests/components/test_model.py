"""The model builder: forward passes per modality, trainable parts, param groups, save/load, the real path."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from components.conversation import parse_sample
from components.model import (
    ModelSpec,
    build_model,
    count_parameters,
    group_of,
    load_model,
    param_groups,
    save_model,
    set_trainable,
)


def rows_for(demo_dir, processor, splits=("single_image", "multi_image", "video", "text"), n=2):
    root, manifests = demo_dir
    rows = []
    for split in splits:
        with open(manifests[split]) as f:
            records = [json.loads(line) for line in f][:n]
        for record in records:
            sample = parse_sample(record)
            if sample.video:
                media = processor.media(frames=processor.sample_video(root / sample.video).frames)
            else:
                media = processor.media([Image.open(root / p) for p in sample.images])
            ids = processor.tokenize(sample, media.token_counts)
            rows.append(
                {
                    "input_ids": ids.input_ids,
                    "labels": ids.labels,
                    "modality": media.modality,
                    "pixel_values": media.pixel_values,
                    "image_sizes": media.image_sizes,
                }
            )
    return rows


def test_tiny_model_size_and_names(tiny_model):
    _, model, processor = tiny_model
    tokenizer = processor.tokenizer
    assert 1_000_000 <= count_parameters(model) <= 5_000_000
    names = {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("model.")}
    assert {"vision_tower", "multi_modal_projector", "language_model", "image_newline"} <= names
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


@pytest.mark.parametrize("split", ["single_image", "multi_image", "video", "text"])
def test_forward_backward_per_modality_never_mismatches(demo_dir, tiny_model, split):
    spec, model, processor = tiny_model
    batch = processor.collate(rows_for(demo_dir, processor, (split,), n=2))
    model.zero_grad()
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None


def test_mixed_batch_of_every_modality_equals_its_rows_alone(demo_dir, tiny_model):
    """A batch of an image, a multi-image, a video and a text row gives each row the loss it has alone:
    every row's media reach that row's placeholders (swapped or misplaced features change the losses)."""
    spec, model, processor = tiny_model
    rows = rows_for(demo_dir, processor, n=1)
    model.eval()
    with torch.no_grad():
        mixed = model(**processor.collate(rows)).loss
        sums, counts = 0.0, 0
        for row in rows:
            n = int((torch.as_tensor(row["labels"])[1:] != -100).sum())  # labels shift by one
            sums += float(model(**processor.collate([row])).loss) * n
            counts += n
    assert {r["modality"] for r in rows} == {"image", "multi_image", "video", "text"}
    assert float(mixed) == pytest.approx(sums / counts, rel=1e-5)


def test_set_trainable_and_param_groups(tiny_model):
    _, model, _ = tiny_model
    counts = set_trainable(model, ["multi_modal_projector"])
    assert (
        counts["vision_tower"] == 0 and counts["language_model"] == 0 and counts["multi_modal_projector"] > 0
    )
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert model.model.image_newline.requires_grad
    set_trainable(model, ["vision_tower", "multi_modal_projector", "language_model"])
    groups = param_groups(model, 1e-5, vision_lr=2e-6, weight_decay=0.1)
    lrs = {part: g["lr"] for g in groups for part in g["parts"]}
    assert lrs["vision_tower"] == pytest.approx(lrs["language_model"] / 5)
    assert lrs["multi_modal_projector"] == lrs["language_model"]
    # one group per (LR, decay): the projector shares the LLM's groups, biases and norms take no decay
    assert sorted(g["name"] for g in groups) == [
        "multi_modal_projector+language_model",
        "multi_modal_projector+language_model_no_decay",
        "vision_tower",
        "vision_tower_no_decay",
    ]
    assert all(g["weight_decay"] == 0 for g in groups if g["name"].endswith("_no_decay"))
    assert all(g["weight_decay"] == 0.1 for g in groups if not g["name"].endswith("_no_decay"))
    assert group_of(groups, "language_model")["weight_decay"] == 0.1
    assert sum(p.numel() for g in groups for p in g["params"]) == count_parameters(model)
    undecayed = param_groups(model, 1e-5, vision_lr=2e-6, projector_lr=1e-4)  # no decay: one group per LR
    assert sorted(g["name"] for g in undecayed) == ["language_model", "multi_modal_projector", "vision_tower"]
    with pytest.raises(ValueError, match="trainable parts"):
        set_trainable(model, ["decoder"])


def test_save_and_load_roundtrip_gives_same_logits(demo_dir, tiny_model, tmp_path):
    spec, model, processor = tiny_model
    batch = processor.collate(rows_for(demo_dir, processor, ("single_image",), n=1))
    save_model(model, processor, str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "model.safetensors").exists() and (
        tmp_path / "ckpt" / "MANIFEST.json"
    ).exists()
    assert not list((tmp_path / "ckpt").glob("*.bin"))
    from transformers import LlavaOnevisionForConditionalGeneration

    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    loaded, proc2 = load_model(f"file://{tmp_path / 'ckpt'}")
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
        assert torch.equal(hf(**batch).logits, ref)
        assert torch.equal(loaded.eval()(**batch).logits, ref)
    assert proc2.tokenizer.encode("a red circle") == processor.tokenizer.encode("a red circle")
    assert proc2.config == processor.config


def test_real_path_from_separately_saved_vision_and_llm(tmp_path):
    """The HF-id / local-path code path, against tiny pretrained parts saved to disk."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from components.demo_data import tokenizer_corpus
    from components.model import TINY_LLM, TINY_VISION, build_tiny_tokenizer

    tok = build_tiny_tokenizer(tokenizer_corpus())
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), **TINY_LLM))
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    vision = SiglipVisionModel(SiglipVisionConfig(image_size=56, patch_size=14, **TINY_VISION))
    vision.save_pretrained(tmp_path / "vision")
    model, processor = build_model(ModelSpec(vision=str(tmp_path / "vision"), llm=str(tmp_path / "llm")))
    tokenizer = processor.tokenizer
    assert torch.equal(model.lm_head.weight, llm.lm_head.weight)
    ref = vision.state_dict()
    for name, p in model.model.vision_tower.state_dict().items():
        assert torch.equal(p, ref[name]), name
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "linear"])
def test_llava_arch_for_v1_and_v1_5(demo_dir, tmp_path, projector):
    from components.anyres import AnyResConfig

    spec = ModelSpec(
        arch="llava",
        projector=projector,
        vision_feature_layer=-2,
        template="vicuna_v1",
        anyres=AnyResConfig(tile_size=56),
    )
    model, processor = build_model(spec)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    batch = processor.collate(rows_for(demo_dir, processor, ("single_image", "multi_image", "text"), n=1))
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    save_model(model, processor, str(tmp_path / "m"))
    loaded, _ = load_model(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).logits, logits)
    if projector == "linear":
        assert sum(p.numel() for p in model.model.multi_modal_projector.parameters()) == 64 * 192 + 192


def test_build_is_deterministic():
    a, _ = build_model(ModelSpec(), seed=3)
    b, _ = build_model(ModelSpec(), seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert np.isclose(float(a.lm_head.weight.sum()), float(b.lm_head.weight.sum()))


@pytest.mark.parametrize(
    "trainable",
    [("multi_modal_projector",), ("vision_tower", "multi_modal_projector", "language_model")],
    ids=["stage1", "full-model"],
)
def test_activation_checkpointing_gives_the_same_gradients(demo_dir, trainable):
    """With the LLM's and the vision tower's layers checkpointed, every trainable part's gradients equal those
    without (1e-5, fp32); in Stage-1 (both frozen) only the projector has gradients and they are not zero.
    That the layers really go through torch's checkpoint is counted: each LLM and vision layer calls it
    once per forward with checkpointing, never without.
    Guards: enable_activation_checkpointing; fails with it a no-op."""
    from components.model import enable_activation_checkpointing

    grads = []
    for checkpointing in (False, True):
        model, processor = build_model(ModelSpec(attn_implementation="eager"))
        set_trainable(model, list(trainable))
        if checkpointing:
            enable_activation_checkpointing(model, ("language_model", "vision_tower"))
        model.train()
        calls = {"language_model": 0, "vision_tower": 0}
        layers = {
            "language_model": model.model.language_model.layers,
            "vision_tower": model.model.vision_tower.encoder.layers,
        }
        for part, stack in layers.items():
            for layer in stack:
                func = getattr(layer, "_gradient_checkpointing_func", None)
                if func is not None:

                    def counted(*args, _func=func, _part=part, _calls=calls, **kwargs):
                        _calls[_part] += 1
                        return _func(*args, **kwargs)

                    layer._gradient_checkpointing_func = counted
        model(**processor.collate(rows_for(demo_dir, processor, n=1))).loss.backward()
        if checkpointing:  # the vision tower runs once per media kind in the batch
            assert calls["language_model"] == len(layers["language_model"]), calls
            assert calls["vision_tower"] >= len(layers["vision_tower"]), calls
            assert calls["vision_tower"] % len(layers["vision_tower"]) == 0, calls
        else:
            assert calls == {"language_model": 0, "vision_tower": 0}
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    for name in plain:  # a part the features skip (SigLIP's post_layernorm) has no gradient either way
        assert (plain[name] is None) == (checkpointed[name] is None), name
        if plain[name] is not None:
            assert (plain[name] - checkpointed[name]).abs().max() <= 1e-5, name
    if trainable == ("multi_modal_projector",):
        assert all("multi_modal_projector" in n or "image_newline" in n for n in plain)
        assert any(g.abs().sum() > 0 for n, g in checkpointed.items() if "multi_modal_projector" in n)


def test_attention_implementation_is_built_and_recorded(tmp_path):
    model, processor = build_model(ModelSpec(attn_implementation="eager"))
    assert model.config.text_config._attn_implementation == "eager"
    save_model(model, processor, str(tmp_path / "m"))
    assert (
        json.loads((tmp_path / "m" / "config.json").read_text())["llava_ray"]["attn_implementation"]
        == "eager"
    )
    loaded, _ = load_model(str(tmp_path / "m"))
    assert loaded.config.text_config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="attn_implementation: expected one of"):
        ModelSpec(attn_implementation="fast")
