"""Our exports against plain transformers: the processor files, the chat template, the tiles and ids on
every modality, generation that stops by itself, and the README's snippet. transformers is the
reference throughout; nothing of ours is imported on the HF side."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from components.anyres import AnyResConfig
from components.conversation import IGNORE_INDEX, TEMPLATES, Turn, content_text, parse_sample
from components.generation import generate
from components.model import ModelSpec, build_model, load_model, save_model
from components.processor import LlavaProcessor, Prompt, VideoSampling

SIGLIP = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
README = Path(__file__).resolve().parents[2] / "README.md"


def _demo_rows(demo_dir, processor):
    """One held-out record per demo modality: (record, our training row)."""
    root, manifests = demo_dir
    records = [json.loads(line) for line in open(manifests["eval"])]
    picked = {}
    for record in records:
        sample = parse_sample(record)
        picked.setdefault(sample.modality, (record, sample))
    out = []
    for modality in ("image", "multi_image", "video", "text"):
        record, sample = picked[modality]
        if sample.video:
            media = processor.media(frames=processor.sample_video(root / sample.video).frames)
        else:
            media = processor.media([Image.open(root / p).convert("RGB") for p in sample.images])
        ids = processor.tokenize(sample, media.token_counts)
        out.append(
            (
                record,
                sample,
                {
                    "input_ids": ids.input_ids,
                    "labels": ids.labels,
                    "modality": media.modality,
                    "pixel_values": media.pixel_values,
                    "image_sizes": media.image_sizes,
                },
            )
        )
    return out


@pytest.fixture(scope="module")
def export(demo_dir, tmp_path_factory):
    """A tiny OneVision model fitted to one held-out record per modality (so greedy answers end with the
    stop token by themselves), exported with its processor: video at 4 fps, at most 8 frames."""
    spec = ModelSpec(anyres=AnyResConfig(tile_size=56, **SIGLIP))
    model, processor = build_model(spec)
    processor = processor.replace(video=VideoSampling(fps=4.0, max_frames=8))
    rows = [row for _, _, row in _demo_rows(demo_dir, processor)]
    batch = processor.collate(rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(80):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("export") / "hf"
    save_model(model.eval(), processor, str(path))
    return path, processor


def hf_onevision_processor(path):
    """transformers' LlavaOnevisionProcessor from the export's files. AutoProcessor would also build the
    video processor, which needs torchvision, and torchvision can't be imported beside the CPU torch wheel
    here: the same class is built from the same files with the video processor left out."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionProcessor

    config = json.loads((Path(path) / "processor_config.json").read_text())
    processor = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    processor.tokenizer = AutoTokenizer.from_pretrained(path)
    processor.image_processor = AutoImageProcessor.from_pretrained(path)
    processor.video_processor = None
    processor.chat_template = processor.tokenizer.chat_template
    for key in (
        "num_image_tokens",
        "vision_feature_select_strategy",
        "vision_aspect_ratio",
        "image_token",
        "video_token",
    ):
        setattr(processor, key, config[key])
    processor.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    processor.video_token_id = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    return processor


def hf_messages(sample):
    """The sample's first question as HF content parts in the natural interleaved form (its text around
    each placeholder, whitespace kept, a media part for each placeholder), and the question's text, which
    the parts must give (content_text, the rule the chat template and the endpoint share)."""
    question = next(t.text for t in sample.turns if t.role == "user")
    return [{"role": "user", "content": interleaved_parts(question)}], question


def interleaved_parts(question: str) -> list[dict]:
    parts = []
    for piece in re.split(r"(<image>|<video>)", question):
        if piece in ("<image>", "<video>"):
            parts.append({"type": piece[1:-1]})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def content_forms(question: str, modality: str) -> dict[str, list[dict]]:
    """The ways clients send one question with its media: interleaved as the text reads; our own
    placeholders in one text part, the media parts after it; and images first, then the question (not for
    multi-view samples: their "View k:" labels are not in such a request, and Image k: is what we add)."""
    media = [{"type": piece[1:-1]} for piece in re.findall(r"<image>|<video>", question)]
    forms = {
        "interleaved": interleaved_parts(question),
        "placeholders": [{"type": "text", "text": question}, *media],
    }
    if "View 1:" not in question:
        rest = re.split(r"<image>\n|<video>\n", question)[-1]
        forms["images first"] = [*media, {"type": "text", "text": rest}]
    return forms


def as_pairs(parts: list[dict]) -> list[tuple[str, str]]:
    return [(p["type"], p.get("text", "")) for p in parts]


def test_export_has_every_file_transformers_needs(export):
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    path, processor = export
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
    } <= names
    model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    image = AutoImageProcessor.from_pretrained(path)
    assert type(image).__name__.startswith("LlavaOnevisionImageProcessor")
    assert list(image.image_mean) == [0.5, 0.5, 0.5] and image.size["height"] == 56
    assert len(image.image_grid_pinpoints) == 36
    unified = json.loads((path / "processor_config.json").read_text())
    assert unified["num_image_tokens"] == 16 and unified["vision_feature_select_strategy"] == "full"
    assert unified["vision_aspect_ratio"] == "anyres_max_9" and unified["image_processor"]["do_pad"] is True
    generation = json.loads((path / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(path)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in generation["eos_token_id"] and generation["pad_token_id"] == tokenizer.pad_token_id
    config = AutoConfig.from_pretrained(path)
    assert config.vision_feature_layer == -1 and config.vision_feature_select_strategy == "full"


def test_hf_processor_gives_our_ids_tiles_and_sizes_on_every_modality(export, demo_dir):
    """Images: transformers' processor from the export's files gives our input_ids, pixel_values (within
    1e-5) and image_sizes. Video: its processor needs torchvision, so its config is checked against our
    sampling and our frames against a plain bicubic resize with its mean/std, and the ids against the
    token count transformers' processor computes for those frames."""
    root, _ = demo_dir
    path, ours = export
    hf = hf_onevision_processor(path)
    video_config = json.loads((path / "video_preprocessor_config.json").read_text())
    for _, sample, _ in _demo_rows(demo_dir, ours):
        messages, joined = hf_messages(sample)
        text = hf.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = ours.prompt_row(
            Prompt(
                [Turn("user", joined)],
                [Image.open(root / p) for p in sample.images],
                ours.sample_video(root / sample.video).frames if sample.video else None,
            )
        )
        if sample.video:
            assert (
                video_config["size"] == {"height": 56, "width": 56}
                and video_config["image_mean"] == [0.5] * 3
            )
            assert (video_config["fps"], video_config["num_frames"]) == (4.0, 8)
            frames = ours.sample_video(root / sample.video).frames
            assert len(frames) == 8
            resized = np.stack(
                [np.asarray(Image.fromarray(f).resize((56, 56), Image.BICUBIC)) for f in frames]
            )
            expected = (resized.transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.5
            assert np.abs(prompt["pixel_values"] - expected).max() <= 1e-5
            count = hf._get_num_multimodal_tokens(video_sizes=[(len(frames), 64, 64)])["num_video_tokens"][0]
            ids = hf.tokenizer(text.replace("<video>", "<video>" * count))["input_ids"]
            assert ids == prompt["input_ids"].tolist()
            continue
        images = [Image.open(root / p) for p in sample.images] or None
        out = hf(images=[images] if images else None, text=[text], return_tensors="np")
        assert out["input_ids"][0].tolist() == prompt["input_ids"].tolist(), sample.modality
        if images:
            pixels = np.concatenate(list(out["pixel_values"])) if len(images) > 1 else out["pixel_values"][0]
            assert pixels.shape == prompt["pixel_values"].shape
            assert np.abs(pixels - prompt["pixel_values"]).max() <= 1e-5
            assert [tuple(s) for s in out["image_sizes"]] == [tuple(s) for s in prompt["image_sizes"]]


def test_hf_generate_stops_by_itself_with_our_answers(export, demo_dir):
    """transformers' own generate, given only the inputs (no eos, no stopping criteria), stops at the
    template's stop token (generation_config.json) and gives our greedy answer, on every modality."""
    from transformers import AutoModelForImageTextToText

    root, _ = demo_dir
    path, _ = export
    model, ours = load_model(str(path))
    hf_model = AutoModelForImageTextToText.from_pretrained(path).eval()
    stop = ours.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for record, sample, _ in _demo_rows(demo_dir, ours):
        images = [Image.open(root / p) for p in sample.images]
        frames = ours.sample_video(root / sample.video).frames if sample.video else None
        row = ours.prompt_row(Prompt([Turn("user", next(t.text for t in sample.turns))], images, frames))
        ours_out = generate(model, ours, [row], max_new_tokens=16)[0]
        batch = ours.collate([row])
        batch.pop("labels")
        with torch.no_grad():
            out = hf_model.generate(**batch, max_new_tokens=16, do_sample=False)
        new = out[0, batch["input_ids"].shape[1] :].tolist()
        assert new[-1] == stop and len(new) < 16, (sample.modality, new)
        assert ours.tokenizer.decode(new[:-1]) == ours_out["text"] == record["answer"], sample.modality
        assert ours_out["finish_reason"] == "stop"


def test_every_content_form_of_a_demo_question_gives_its_training_ids(export, demo_dir):
    """Each held-out demo question with media (single image, multi-image, multi-view, video), sent the ways
    clients send it (interleaved, our placeholders, images first), becomes the sample's own training text
    (content_text, the endpoint's rule), and the export's chat template renders the same parts to the
    training ids through transformers.
    Guards: content_text, one rule for parts; fails with parts joined by newlines."""
    from transformers import AutoTokenizer

    root, manifests = demo_dir
    path, ours = export
    tokenizer = AutoTokenizer.from_pretrained(path)
    seen = set()
    for line in open(manifests["eval"]):
        record = json.loads(line)
        sample = parse_sample(record)
        if sample.modality == "text" or record["task"] in seen:
            continue
        seen.add(record["task"])
        question = next(t.text for t in sample.turns if t.role == "user")
        images = [Image.open(root / p).convert("RGB") for p in sample.images]
        frames = ours.sample_video(root / sample.video).frames if sample.video else None
        training = ours.prompt_row(Prompt([Turn("user", question)], images, frames))["input_ids"].tolist()
        counts = ours.media(images, frames).token_counts
        for form, parts in content_forms(question, sample.modality).items():
            assert content_text(as_pairs(parts)) == question, (record["task"], form)
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=False
            )
            for count, marker in zip(counts, re.findall(r"<image>|<video>", question), strict=True):
                text = text.replace(marker, "\0" * count, 1)
            marker_id = ours.video_token_id if sample.video else ours.image_token_id
            ids = [marker_id if t == "\0" else t for t in _encode_with_markers(tokenizer, text)]
            assert ids == training, (record["task"], form)
    assert {"color", "shape_mc", "first_color", "last_color", "multiview", "end_color"} <= seen


def _encode_with_markers(tokenizer, text: str) -> list:
    """Ids of ``text`` in which each NUL stands for one media token (kept as the string)."""
    out = []
    for k, piece in enumerate(text.split("\0")):
        if k:
            out.append("\0")
        if piece:
            out.extend(tokenizer.encode(piece, add_special_tokens=False))
    return out


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("text"), st.text(alphabet="ab :\n?", max_size=6)),
            st.tuples(st.sampled_from(["image", "video"]), st.just("")),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_the_chat_template_joins_parts_by_the_endpoints_rule(chatml_tokenizer, parts):
    """Any list of text, image and video parts renders in the exported chat template exactly as
    content_text (the endpoint's rule) joins it: one rule, in Python and in Jinja."""
    hf_parts = [{"type": kind, "text": text} if kind == "text" else {"type": kind} for kind, text in parts]
    rendered = chatml_tokenizer.apply_chat_template([{"role": "user", "content": hf_parts}], tokenize=False)
    head = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert rendered == head + content_text(parts) + "<|im_end|>\n"


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    _, processor = build_model(ModelSpec(template="chatml"))
    path = tmp_path_factory.mktemp("chatml")
    processor.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_template_renders_what_we_train_on(name, tmp_path):
    """The export's chat template, through transformers' apply_chat_template: string content and content
    parts give our ids; add_generation_prompt adds the assistant's prompt; the {% generation %} mask on a
    multi-turn conversation is exactly our labels (assistant answers and their stops, nothing else); a
    system message takes the default system prompt's place.
    Guards: a system message replaces the default prompt; fails with it prepended to the default."""
    from transformers import AutoTokenizer

    model, processor = build_model(ModelSpec(template=name))
    processor.save_pretrained(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    record = {
        "id": "mt",
        "image": "x.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color is it?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "And the shape?"},
            {"from": "gpt", "value": "A circle."},
        ],
    }
    sample = parse_sample(record)
    ours = processor.tokenize(sample, [1])
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "And the shape?"},
        {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
    ]
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ours.input_ids.tolist()
    mask = np.asarray(out["assistant_masks"], dtype=bool)
    assert np.array_equal(mask, ours.labels != IGNORE_INDEX), name
    # a prompt: the last turn from the user, with and without the assistant's prompt
    prompt = processor.prompt_row(Prompt([Turn("user", "Hi there")]))
    user = [{"role": "user", "content": "Hi there"}]
    with_prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert with_prompt == prompt["input_ids"].tolist()
    with_text = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    without_text = tokenizer.apply_chat_template(user, add_generation_prompt=False, tokenize=False)
    assert with_text == without_text + TEMPLATES[name].assistant_prompt
    # a system message replaces the default system prompt (in its place; not before or beside it)
    system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tokenize=False
    )
    default = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    template = TEMPLATES[name]
    bos = tokenizer.bos_token if template.add_bos else ""
    prefix, replaced = bos + template.prefix(), bos + template.prefix("Be brief.")
    assert default.startswith(prefix) and system == replaced + default[len(prefix) :]


def test_videos_marked_with_image_are_mapped_to_video():
    """LLaVA-NeXT's own video data marks the video with <image>: it is read as <video>."""
    sample = parse_sample(
        {
            "id": "v",
            "video": "v.mp4",
            "conversations": [
                {"from": "human", "value": "<image>\nWhere does it go?"},
                {"from": "gpt", "value": "left"},
            ],
        }
    )
    assert sample.turns[0].text == "<video>\nWhere does it go?"


def test_labels_cover_only_assistant_content_and_its_stop(export):
    """The masking rule (README): on a multi-turn ChatML sample, the labelled tokens decode to exactly each
    answer plus <|im_end|>; role headers, <|im_start|>, the system prompt and newlines carry no loss
    (the official preprocess_qwen also trains on role headers and separators)."""
    _, processor = export
    sample = parse_sample(
        {
            "id": "m",
            "conversations": [
                {"from": "human", "value": "What is two plus three?"},
                {"from": "gpt", "value": "five"},
                {"from": "human", "value": "And one plus one?"},
                {"from": "gpt", "value": "two"},
            ],
        }
    )
    out = processor.tokenize(sample, [])
    tok = processor.tokenizer
    spans, current = [], []
    for token, label in zip(out.input_ids.tolist(), out.labels.tolist(), strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    assert spans == ["five<|im_end|>", "two<|im_end|>"]
    unlabelled = tok.decode(
        [t for t, lab in zip(out.input_ids, out.labels, strict=True) if lab == IGNORE_INDEX]
    )
    assert "<|im_start|>assistant\n" in unlabelled and "You are a helpful assistant." in unlabelled


def test_readme_snippet_runs_the_export_with_plain_transformers(export, demo_dir, monkeypatch, capsys):
    """The README's snippet, run as written on an export (its paths pointed at this test's export and a
    held-out image); AutoProcessor is given the same processor its files describe, minus the video
    processor that needs torchvision (see hf_onevision_processor)."""
    import transformers

    root, _ = demo_dir
    path, ours = export
    text = README.read_text()
    snippet = re.search(r"```python\n(# plain transformers.*?)```", text, re.S).group(1)
    assert len([line for line in snippet.splitlines() if line.strip() and not line.startswith("#")]) <= 8
    image_record, image_sample = next(
        (r, s) for r, s, _ in _demo_rows(demo_dir, ours) if s.modality == "image"
    )
    snippet = snippet.replace("demo_out/runs/demo/stage2_ov/hf", str(path))
    snippet = snippet.replace("demo_out/data/", f"{root}/")
    question = json.dumps(hf_messages(image_sample)[0][0]["content"][1]["text"])
    snippet = re.sub(r'"What color is the \w+\?[^"]*"', lambda _: question, snippet)
    snippet = re.sub(r"images/eval-si-\d+\.png", image_record["image"], snippet)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", staticmethod(hf_onevision_processor))
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == image_record["answer"]


def test_processor_round_trips_and_names_what_is_missing(export, tmp_path):
    path, processor = export
    again = LlavaProcessor.from_pretrained(str(path))
    assert again.config == processor.config and again.stop_ids == processor.stop_ids
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(path / name, tmp_path / name)
    with pytest.raises(ValueError, match="expected llava_ray_processor.json or a template"):
        LlavaProcessor.from_pretrained(str(tmp_path))


def test_stage1_sees_the_base_image_only():
    """OneVision's Stage-1 (``anyres.base_only``): a lone image is its base tile, (384/14)^2 = 729 visual
    tokens at 384 px plus the image_newline HF's model appends to every untiled image, not the 1x1 grid's
    2 tiles. The HF model runs such a batch (a lone image gets a blank partner so that the model does not
    tile it): its image features match the tokens exactly."""
    from components.processor import ProcessorConfig

    image = Image.new("RGB", (500, 300), (200, 30, 30))
    full = LlavaProcessor(ProcessorConfig(anyres=AnyResConfig(base_only=True)), None)
    media = full.media([image])
    assert media.pixel_values.shape == (1, 3, 384, 384) and media.token_counts == [27 * 27 + 1]
    model, processor = build_model(ModelSpec(anyres=AnyResConfig(tile_size=56, base_only=True)))
    rows = [processor.prompt_row(Prompt([Turn("user", "<image>\nWhat is it?")], [image]))]
    assert (rows[0]["input_ids"] == processor.image_token_id).sum() == 16 + 1
    batch = processor.collate(rows)
    assert batch["pixel_values"].shape[0] == 2 and batch["batch_num_images"].tolist() == [2]
    with torch.no_grad():
        model.eval()(**batch)  # HF raises when image features and image tokens do not match
