"""The engine's incremental detokenizer (components/engine.py `Detokenizer`) against the tokenizer's own
decode of the whole answer: on a byte-level BPE (our tiny one, as Qwen2's) and on a Llama-style
SentencePiece BPE (Metaspace "▁" spacing, byte fallback, the first space stripped), built here with
transformers' own LlamaTokenizer. The text only ever grows at its end; for real answers (words,
multi-byte characters split over byte tokens, special tokens among them) it is the full decode at every
whole character, and each step decodes a few tokens, not the answer.

Guards: the window's prefix; fails with it left out (spaces before words lost)."""

import json

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from components.decode_output import Detokenizer
from components.demo_data import tokenizer_corpus
from components.model import build_tiny_tokenizer

TEXTS = [
    "The red circle is left of the blue square.",
    "naïve café: 日本語, émigré, 🙂🙃 and ½ of a π.",
    "  two  spaces,\nnew lines,\ttabs and trailing space ",
    "Image 1: a square.\nImage 2: a circle.\nAnswer: B",
]


def _llama_style() -> transformers.PreTrainedTokenizerBase:
    """A SentencePiece-style BPE as Llama/Vicuna (LLaVA-1.5's LLM) ships it: "▁" for spaces, bytes for
    what the vocabulary lacks."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return transformers.LlamaTokenizer(vocab=vocab, merges=[tuple(m) for m in model["merges"]])


@pytest.fixture(scope="module", params=["byte-level", "llama-style"])
def tokenizer(request):
    if request.param == "byte-level":
        return build_tiny_tokenizer(tokenizer_corpus())
    return _llama_style()


def _answers(tokenizer) -> list[list[int]]:
    """Valid answers: the texts' tokens, and the same with special tokens among them."""
    special = sorted(tokenizer.all_special_ids)
    encoded = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    return encoded + [ids[:5] + [special[0]] + ids[5:] + [special[-1]] for ids in encoded]


def _streamed(tokenizer, tokens: list[int]) -> tuple[Detokenizer, list[str], list[int]]:
    """``tokens`` given to a Detokenizer one more at a time: it, the text after each, and the length of
    every token list it decoded."""
    windows: list[int] = []
    original = tokenizer.decode

    def counting(ids, **kwargs):
        windows.append(len(ids))
        return original(ids, **kwargs)

    text = Detokenizer(tokenizer)
    tokenizer.decode = counting
    try:
        shown = [text.add(tokens[:n]) for n in range(1, len(tokens) + 1)]
    finally:
        del tokenizer.decode
    return text, shown, windows


def test_the_text_grows_by_appending_and_shows_every_whole_character(tokenizer):
    """At every token, the text is the full decode of the tokens so far whenever that decode ends on a
    whole character, and it only ever grows at its end."""
    for tokens in _answers(tokenizer):
        _, shown, _ = _streamed(tokenizer, tokens)
        for n, (seen, now) in enumerate(zip(["", *shown[:-1]], shown, strict=True), start=1):
            assert now.startswith(seen), (tokens[:n], seen, now)
            full = tokenizer.decode(tokens[:n], skip_special_tokens=True)
            if not full.endswith("\ufffd"):  # a whole character last: all of it shown
                assert now == full, (tokens[:n], now, full)
        assert shown[-1] == tokenizer.decode(tokens, skip_special_tokens=True), tokens


def test_random_tokens_only_append(tokenizer):
    """Any ids (invalid byte runs, specials anywhere): the text only grows, and for the byte-level BPE it
    is the full decode. (A byte-fallback decoder makes a whole invalid byte run U+FFFD, so the engine's
    final answer is one full decode; see Detokenizer.)"""
    rng = np.random.default_rng(0)
    for _ in range(20):
        tokens = rng.integers(0, len(tokenizer), 60).tolist()
        _, shown, _ = _streamed(tokenizer, tokens)
        for n, (seen, now) in enumerate(zip(["", *shown[:-1]], shown, strict=True), start=1):
            assert now.startswith(seen), (tokens[:n], seen, now)
        full = tokenizer.decode(tokens, skip_special_tokens=True)
        if isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel):
            assert shown[-1] == full.rstrip("\ufffd") or shown[-1] == full, tokens


def test_a_split_character_is_held_until_its_last_byte(tokenizer):
    """An emoji spelled as byte tokens: nothing of it shows until its last byte, then all of it."""
    tokens = tokenizer.encode("ok 🙂", add_special_tokens=False)
    _, shown, _ = _streamed(tokenizer, tokens)
    assert shown[-1] == tokenizer.decode(tokens) and shown[-1].endswith("🙂")
    assert not any("\ufffd" in s for s in shown), shown


def test_each_step_decodes_a_window_not_the_answer(tokenizer):
    """At the 400th token of an answer, a step decodes a few tokens, not 400 (the O(n^2) it replaces)."""
    tokens = tokenizer.encode(" ".join(TEXTS * 12), add_special_tokens=False)[:400]
    assert len(tokens) == 400
    text, shown, windows = _streamed(tokenizer, tokens)
    assert max(windows) <= 8, max(windows)
    assert tokenizer.decode(tokens, skip_special_tokens=True).startswith(text.text)


def test_a_model_stuck_on_a_stray_byte_keeps_streaming_in_a_bounded_window(tokenizer):
    """A model that repeats a lone continuation byte (invalid UTF-8, each one U+FFFD for good): the text
    still grows every few tokens and a step still decodes a few tokens, instead of holding everything back
    in a window as long as the answer. (Without the 4-token bound: nothing shown, windows of 60 tokens.)"""
    stray = next(
        i
        for i in range(len(tokenizer))
        if tokenizer.decode([i]) == "\ufffd" and tokenizer.decode([i, i, i]) == "\ufffd" * 3
    )
    tokens = tokenizer.encode("ok", add_special_tokens=False) + [stray] * 60
    text, shown, windows = _streamed(tokenizer, tokens)
    assert max(windows) <= 12, max(windows)
    assert len(shown[-1]) >= len(tokens) - 6 and text.text.startswith("ok"), text.text
