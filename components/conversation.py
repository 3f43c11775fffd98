"""The sample schema, the chat templates, and tokenization with assistant-only labels.

Ids are built turn by turn: every segment is tokenized on its own and concatenated, and each
media placeholder is expanded to exactly the number of media tokens the model will produce.
So the label mask cannot drift from the text by construction (the official trainer's
"tokenization mismatch" cannot happen), and an over-long sample is an error, never truncated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from components.errors import Mismatch, sample_field

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDER_RE = re.compile(r"<image>|<video>")
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
"""The tokens every tokenizer of ours has (the tiny BPE is built with them; pretrained ones get the
missing media and ChatML tokens added)."""

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class SampleError(Mismatch):
    """A sample that cannot be used, with the sample id, the field, and what was expected against found;
    ``kind`` is the rejects table's error type."""

    def __init__(
        self, sample_id: str, field_name: str, expected: str, found: str, kind: str = "invalid_sample"
    ):
        super().__init__(sample_field(sample_id, field_name), expected, found)
        self.sample_id = sample_id
        self.field = field_name
        self.kind = kind


class SampleTooLongError(SampleError):
    def __init__(self, sample_id: str, length: int, max_length: int):
        super().__init__(
            sample_id, "conversations", f"at most {max_length} tokens", f"{length} tokens", "too_long"
        )
        self.length = length


@dataclass
class Turn:
    role: str
    """user, assistant or system."""
    text: str


@dataclass
class Sample:
    """One LLaVA record, validated."""

    id: str
    turns: list[Turn]
    images: list[str] = field(default_factory=list)
    video: str | None = None
    source: str = ""

    @property
    def modality(self) -> str:
        if self.video is not None:
            return "video"
        if len(self.images) > 1:
            return "multi_image"
        if len(self.images) == 1:
            return "image"
        return "text"

    @property
    def num_media(self) -> int:
        return len(self.images) + (1 if self.video is not None else 0)


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: what an error message quotes of a bad value or path."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_sample(record: dict, source: str = "", default_id: str = "?") -> Sample:
    """Validate a LLaVA JSON record (``conversations`` with from/value, or role/content ``messages``).
    ``default_id``: the sample's name when the record has no id (its place in its manifest)."""
    if not isinstance(record, dict):
        raise SampleError(default_id, "<record>", "a JSON object", type(record).__name__)
    raw_id = record.get("id", record.get("sample_id"))
    sample_id = default_id if raw_id is None or raw_id == "" else str(raw_id)
    images, video = _media(record, sample_id)
    field_name = "conversations" if "conversations" in record else "messages"
    turns = _turns(record.get("conversations", record.get("messages")), sample_id, field_name)
    _check_order(turns, sample_id, field_name)
    if video is not None:  # LLaVA-NeXT's own video data marks the video with <image>: the same placeholder
        turns = [Turn(t.role, t.text.replace(IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)) for t in turns]
    _check_placeholders(turns, len(images) + (video is not None), video is not None, sample_id, field_name)
    return Sample(id=sample_id, turns=turns, images=list(images), video=video, source=source)


def _media(record: dict, sample_id: str) -> tuple[list[str], str | None]:
    """(image paths, video path) of a record: ``image`` (a path or a list) or ``images``, or a ``video``."""
    if "image" in record and "images" in record:
        raise SampleError(sample_id, "image", "one of image or images", "both", "ambiguous_media")
    images = record.get("image", record.get("images"))
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    elif not (isinstance(images, list) and all(isinstance(x, str) and x for x in images)):
        raise SampleError(sample_id, "image", "a path or a list of paths", short_repr(images))
    video = record.get("video")
    if video is not None and not (isinstance(video, str) and video):
        raise SampleError(sample_id, "video", "a path", short_repr(video))
    if video is not None and images:
        raise SampleError(sample_id, "image", "no images beside a video", f"{len(images)} images and a video")
    return images, video


def _turns(raw_turns, sample_id: str, field_name: str) -> list[Turn]:
    """Each turn's role (its alias resolved) and non-empty text."""
    if not isinstance(raw_turns, list) or not raw_turns:
        raise SampleError(sample_id, field_name, "a non-empty list of turns", short_repr(raw_turns))
    turns: list[Turn] = []
    for i, raw in enumerate(raw_turns):
        where = f"{field_name}[{i}]"
        if not isinstance(raw, dict):
            raise SampleError(sample_id, where, "an object with from/value or role/content", short_repr(raw))
        role = raw.get("from", raw.get("role"))
        text = raw.get("value", raw.get("content"))
        if role not in ROLE_ALIASES:
            raise SampleError(
                sample_id, f"{where}.from", "one of human, gpt, user, assistant, system", short_repr(role)
            )
        if not isinstance(text, str):
            raise SampleError(sample_id, f"{where}.value", "a string", short_repr(text))
        if not text.strip():
            raise SampleError(
                sample_id, f"{where}.value", "a non-empty turn", "an empty string", "empty_turn"
            )
        turns.append(Turn(ROLE_ALIASES[role], text))
    return turns


def _check_order(turns: list[Turn], sample_id: str, field_name: str) -> None:
    """An optional system turn, then user and assistant alternating, the assistant last."""
    system = 1 if turns[0].role == "system" else 0
    rest = turns[system:]
    if not rest:
        raise SampleError(
            sample_id, field_name, "at least one user and one assistant turn", "only a system turn"
        )
    for i, turn in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise SampleError(
                sample_id, f"{field_name}[{i + system}].from", f"{expected} (turns alternate)", turn.role
            )
    if rest[-1].role != "assistant":
        raise SampleError(sample_id, field_name, "the last turn from the assistant", "a user turn")


def _check_placeholders(
    turns: list[Turn], num_media: int, has_video: bool, sample_id: str, field_name: str
) -> None:
    """One placeholder per medium, of the medium's kind, in user turns only."""
    if not has_video and any(VIDEO_PLACEHOLDER in t.text for t in turns):
        raise SampleError(
            sample_id,
            field_name,
            "<image> placeholders (the sample has no video)",
            "a <video> placeholder",
            "placeholder_mismatch",
        )
    placeholders = sum(len(_PLACEHOLDER_RE.findall(t.text)) for t in turns)
    if placeholders != num_media:
        raise SampleError(
            sample_id,
            field_name,
            f"{num_media} media placeholder(s) for {num_media} media",
            f"{placeholders} placeholder(s)",
            "placeholder_mismatch",
        )
    for t in turns:
        if t.role != "user" and _PLACEHOLDER_RE.search(t.text):
            raise SampleError(
                sample_id, field_name, "placeholders only in user turns", f"one in a {t.role} turn"
            )


# ---- a message's content parts -------------------------------------------------------------


MEDIA_PLACEHOLDERS = {"image": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}


def content_text(parts: list[tuple[str, str]]) -> str:
    """One message's content parts, ``(kind, text)`` with kind text, image or video, as our text: the rule
    the endpoint and the exported chat template share, so that what clients send is the training layout.

    - Text that carries ``<image>``/``<video>`` placeholders is the text: the parts' texts concatenated,
      the media parts filling the placeholders in order (their positions do not matter).
    - Media before any text (images first, then the question): two or more images are labelled
      ``Image 1: <image>`` ... as multi-image samples are (LLaVA-NeXT-Interleave's layout).
    - Otherwise the parts are concatenated in order. Where a media part meets text (or another media
      part) with no whitespace on either side, a newline goes between: ``<image>`` then "What is it?"
      is ``<image>\nWhat is it?``, and "Image 1: " then ``<image>`` stays ``Image 1: <image>``.
    """
    parts = [(kind, text) for kind, text in parts if kind != "text" or text]
    texts = "".join(text for kind, text in parts if kind == "text")
    if _PLACEHOLDER_RE.search(texts):
        return texts
    media = [kind for kind, _ in parts if kind != "text"]
    lead = next((i for i, (kind, _) in enumerate(parts) if kind == "text"), len(parts))
    if lead == len(media) >= 2 and set(media) == {"image"}:
        labelled = [piece for k in range(lead) for piece in (("text", f"Image {k + 1}: "), parts[k])]
        parts = labelled + parts[lead:]
    out, previous = "", None
    for kind, text in parts:
        piece = text if kind == "text" else MEDIA_PLACEHOLDERS[kind]
        touches_media = previous is not None and "media" in (previous, "text" if kind == "text" else "media")
        if touches_media and not (out[-1:].isspace() or piece[:1].isspace()):
            out += "\n"
        out, previous = out + piece, "text" if kind == "text" else "media"
    return out


# ---- templates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A chat format as segments: prefix, then per exchange user(q) then assistant(a) + stop."""

    name: str
    system: str
    user_format: str
    """The user segment; {text} is the message."""
    assistant_prompt: str
    """What opens the assistant's turn (the chat template's generation prompt); always after a user turn."""
    assistant_format: str
    """The labelled assistant segment; {text} is the answer and it ends with the stop."""
    prefix_format: str = "{system}"
    after_assistant: str = ""
    """Unlabelled text after each assistant segment (chatml's newline)."""
    stop: str = ""
    add_bos: bool = False
    text_in_user: bool = True
    """False for "plain": the user turn contributes only its media."""

    def prefix(self, system: str | None = None) -> str:
        return self.prefix_format.format(system=self.system if system is None else system)


def _only_media(text: str) -> str:
    return "".join(_PLACEHOLDER_RE.findall(text))


VICUNA_V0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

DEFAULT_TEMPLATE = "chatml"
"""The conversational template where none is named (OneVision's and Interleave's Qwen-2 ChatML)."""

TEMPLATES: dict[str, Template] = {
    # Stage-1 pre-training: the image, then the caption.
    "plain": Template(
        name="plain",
        system="",
        user_format="{text}",
        assistant_prompt="",
        assistant_format="{text}\n",
        stop="\n",
        text_in_user=False,
    ),
    # LLaVA (1.0): Vicuna-v0, "###" separates turns and stops generation.
    "vicuna_v0": Template(
        name="vicuna_v0",
        system=VICUNA_V0_SYSTEM,
        prefix_format="{system}###",
        user_format="Human: {text}###",
        assistant_prompt="Assistant:",
        assistant_format=" {text}###",
        stop="###",
        add_bos=True,
    ),
    # LLaVA-1.5: Vicuna-v1.
    "vicuna_v1": Template(
        name="vicuna_v1",
        system=VICUNA_V1_SYSTEM,
        prefix_format="{system} ",
        user_format="USER: {text} ",
        assistant_prompt="ASSISTANT:",
        assistant_format=" {text}</s>",
        stop="</s>",
        add_bos=True,
    ),
    # OneVision (Qwen-2): ChatML.
    "chatml": Template(
        name="chatml",
        system="You are a helpful assistant.",
        prefix_format="<|im_start|>system\n{system}<|im_end|>\n",
        user_format="<|im_start|>user\n{text}<|im_end|>\n",
        assistant_prompt="<|im_start|>assistant\n",
        assistant_format="{text}<|im_end|>",
        after_assistant="\n",
        stop="<|im_end|>",
    ),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"template: expected one of {sorted(TEMPLATES)}, found {name!r}")
    return TEMPLATES[name]


# ---- tokenization ----------------------------------------------------------------------------


@dataclass
class TokenizedSample:
    input_ids: np.ndarray
    """int32 [L]."""
    labels: np.ndarray
    """int32 [L]; IGNORE_INDEX except on assistant turns and their stops."""

    def __len__(self) -> int:
        return len(self.input_ids)


def _move_media_to_front(turns: list[Turn]) -> list[Turn]:
    """The "in-the-front" layout: every placeholder moves to the start of the first user turn."""
    found = [p for t in turns for p in _PLACEHOLDER_RE.findall(t.text)]
    out, placed = [], False
    for t in turns:
        text = _PLACEHOLDER_RE.sub("", t.text).strip() if t.role == "user" else t.text
        if t.role == "user" and not placed:
            text = "".join(found) + ("\n" if found else "") + text
            placed = True
        out.append(Turn(t.role, text))
    return out


def tokenize(
    sample: Sample,
    tokenizer,
    template: Template | str,
    media_token_counts: list[int],
    *,
    layout: str = "interleaved",
    max_length: int | None = None,
) -> TokenizedSample:
    """input_ids with each placeholder expanded to its media's token count; labels on assistant turns only."""
    template = get_template(template) if isinstance(template, str) else template
    if len(media_token_counts) != sample.num_media:
        raise SampleError(
            sample.id,
            "media_token_counts",
            f"{sample.num_media} counts (one per media)",
            str(len(media_token_counts)),
        )
    if layout not in ("interleaved", "front"):
        raise ValueError(f"layout: expected 'interleaved' or 'front', found {layout!r}")
    turns = _move_media_to_front(sample.turns) if layout == "front" else sample.turns
    placeholder = VIDEO_PLACEHOLDER if sample.video is not None else IMAGE_PLACEHOLDER
    out = _Tokens(tokenizer, tokenizer.convert_tokens_to_ids(placeholder), media_token_counts)
    if template.add_bos and tokenizer.bos_token_id is not None:
        out.ids.append(tokenizer.bos_token_id)
        out.labels.append(IGNORE_INDEX)
    system = next((t.text for t in turns if t.role == "system"), None)
    out.add(template.prefix(system), False)
    for t in turns:
        if t.role == "user":
            text = t.text if template.text_in_user else _only_media(t.text)
            # the assistant's prompt in one piece with the user turn: as the whole string tokenizes
            out.add_with_media(template.user_format.format(text=text) + template.assistant_prompt)
        elif t.role == "assistant":
            out.add(template.assistant_format.format(text=t.text), True)
            out.add(template.after_assistant, False)
    if max_length is not None and len(out.ids) > max_length:
        raise SampleTooLongError(sample.id, len(out.ids), max_length)
    return TokenizedSample(np.asarray(out.ids, dtype=np.int32), np.asarray(out.labels, dtype=np.int32))


class _Tokens:
    """Ids and labels as a sample's pieces are added; each placeholder becomes its medium's token count."""

    def __init__(self, tokenizer, media_id: int, media_token_counts: list[int]):
        self.tokenizer, self.media_id = tokenizer, media_id
        self.counts = iter(media_token_counts)
        self.ids: list[int] = []
        self.labels: list[int] = []

    def add(self, text: str, labelled: bool) -> None:
        if not text:
            return
        piece = self.tokenizer.encode(text, add_special_tokens=False)
        self.ids.extend(piece)
        self.labels.extend(piece if labelled else [IGNORE_INDEX] * len(piece))

    def add_with_media(self, text: str) -> None:
        """Unlabelled text whose placeholders expand to media tokens."""
        pos = 0
        for m in _PLACEHOLDER_RE.finditer(text):
            self.add(text[pos : m.start()], False)
            n = next(self.counts)
            self.ids.extend([self.media_id] * n)
            self.labels.extend([IGNORE_INDEX] * n)
            pos = m.end()
        self.add(text[pos:], False)


def assistant_targets(sample: Sample, template: Template | str) -> str:
    """The text the labels must decode to: every assistant turn in its template, with its stop."""
    template = get_template(template) if isinstance(template, str) else template
    return "".join(
        template.assistant_format.format(text=t.text) for t in sample.turns if t.role == "assistant"
    )
