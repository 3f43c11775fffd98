"""Prefix KV reuse (components/prefix_cache.py, components/prefill.py): a conversation's turn k prefills
only what follows the longest prefix an earlier turn left, and answers exactly as a full prefill would.
The reference is an engine with no caches at all, compared on token log-probs, not only text."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from components.conversation import Turn
from components.engine import Engine, wait_for
from components.feature_cache import FeatureCache
from components.generation import generate
from components.model import ModelSpec, build_model
from components.prefix_cache import BLOCK, PrefixCache
from components.processor import Prompt
from tests.components.test_engine import DIGESTS, _prompts

FOLLOW_UPS = ["Tell me more.", "Why is that so?", "And what else do you see there?"]


@pytest.fixture(scope="module")
def tiny():
    """The tiny model, its answers held to tokens that are whole characters (the rest masked at the LM
    head), so that an answer re-sent as text tokenizes to what was generated, as a trained model's does,
    and a turn's reuse reaches into the answer before it."""
    torch.manual_seed(0)
    model, processor = build_model(ModelSpec())
    tok = processor.tokenizer
    partial = torch.tensor([t in tok.all_special_ids or "\ufffd" in tok.decode([t]) for t in range(len(tok))])
    partial[processor.stop_ids] = False
    model.lm_head.register_forward_hook(lambda m, i, out: out.masked_fill(partial[: out.shape[-1]], -1e4))
    return model.eval(), processor


def _chat(
    engine: Engine, prompt: Prompt, digests: tuple[str, ...], turns: int = 4
) -> list[tuple[dict, dict]]:
    """``turns`` turns of one conversation, each re-sending the whole history (the API is stateless):
    [(row, result)] per turn, the result with the engine's prefilled-token counter after it."""
    history, out = list(prompt.turns), []
    for k in range(turns):
        row = engine.row(Prompt(history, prompt.images, prompt.video_frames), digests)
        result = wait_for(engine, dict(row=row, max_new_tokens=10, logprobs=True))
        result["prefilled_after"] = engine.stats()["prefilled_tokens"]
        out.append((row, result))
        if k < turns - 1:
            history = [*history, Turn("assistant", result["text"]), Turn("user", FOLLOW_UPS[k])]
    return out


def _common(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if len(differs) else n


@pytest.mark.timeout(300)
def test_each_turn_prefills_only_its_new_tokens_and_answers_as_a_full_prefill(tiny):
    """Four 4-turn conversations (image, two images, video, text) through an engine with the prefix and
    feature caches and through one with neither: every turn's text is the same and every token's log-prob
    within 1e-4; from turn 2 on, the engine reused exactly the longest common prefix of the turn's ids and
    the previous turn's (its prompt and the answer's tokens the KV holds) and prefilled only the rest.
    Guards: the prefix cache's lookup and the KV kept at a sequence's end; fails with the lookup off (0
    reused) or with the kept KV one token short of what its ids say."""
    model, processor = tiny
    reused_engine = Engine(
        model, processor, features=FeatureCache(64 << 20), prefix=PrefixCache(256 << 20)
    ).start()
    plain = Engine(model, processor).start()
    try:
        into_answers = 0
        for name in ("image", "multi_image", "video", "long"):
            prompt, digests = _prompts()[name], DIGESTS[name]
            reference = _chat(plain, prompt, digests)
            before = reused_engine.stats()["prefilled_tokens"]
            got = _chat(reused_engine, prompt, digests)
            for k, ((row, result), (_, expected)) in enumerate(zip(got, reference, strict=True)):
                assert result["text"] == expected["text"], (name, k)
                np.testing.assert_allclose(
                    result["token_logprobs"], expected["token_logprobs"], atol=1e-4, err_msg=f"{name} {k}"
                )
                prefilled = result["prefilled_after"]
                if k == 0:  # at most the text before its first medium (the template's system prompt)
                    assert result["cached_tokens"] <= ([s for s, _ in row["media_spans"]] or [1 << 30])[0]
                else:
                    previous_row, previous = got[k - 1]
                    held = np.concatenate([previous_row["input_ids"], previous["token_ids"]])
                    if previous["finish_reason"] == "length":  # its last token was picked, never fed
                        held = held[:-1]
                    expected_reuse = min(
                        _common(np.asarray(row["input_ids"]), held), len(row["input_ids"]) - 1
                    )
                    assert expected_reuse >= len(previous_row["input_ids"]), (name, k)
                    assert result["cached_tokens"] == expected_reuse, (name, k)
                # the engine's counter moved by this turn's prefill alone
                assert prefilled - before == len(row["input_ids"]) - result["cached_tokens"], (name, k)
                before = prefilled
            into_answers += sum(
                r["cached_tokens"] > len(p["input_ids"]) for (p, _), (_, r) in zip(got, got[1:], strict=False)
            )
        assert into_answers >= 6  # the generated tokens' KV was reused, not only the prompts'
    finally:
        reused_engine.stop()
        plain.stop()


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.timeout(300)
def test_another_image_another_size_or_another_export_never_meets_a_cached_kv(tiny):
    """After a cached turn about image A (120x80): the same words after image B reuse nothing past the
    text before the image; image A's pixels at 200x120 (another file, another AnyRes grid) likewise; and
    a model whose language weights alone differ (the vision fingerprint the feature cache uses is the
    same), sharing the cache, reuses nothing. Each answers as its model does alone.
    Guards: the media's keys in the token identities, and the full-weights root of the hash chain; fails
    with either left out (image B's and the other model's answers then continue image A's KV)."""
    model, processor = tiny
    prefix = PrefixCache(256 << 20)
    engine = Engine(model, processor, features=FeatureCache(64 << 20), prefix=prefix).start()
    words = [Turn("user", "<image>\nWhat color is the shape in this picture? Describe it well.")]
    try:
        first = Prompt(words, [_image(1, (120, 80))])
        wait_for(engine, dict(row=engine.row(first, ("img-a",)), max_new_tokens=6))
        for image, digest in ((_image(2, (120, 80)), "img-b"), (_image(1, (200, 120)), "img-a-200x120")):
            prompt = Prompt(words, [image])
            row = engine.row(prompt, (digest,))
            start = row["media_spans"][0][0]
            out = wait_for(engine, dict(row=row, max_new_tokens=6))
            assert out["cached_tokens"] <= start, digest
            alone = generate(model, processor, [processor.prompt_row(prompt)], max_new_tokens=6)[0]
            assert out["text"] == alone["text"]
        repeat = wait_for(engine, dict(row=engine.row(first, ("img-a",)), max_new_tokens=6))
        assert repeat["cached_tokens"] == len(engine.row(first, ("img-a",))["input_ids"]) - 1  # the control
    finally:
        engine.stop()

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.add_(0.05 * torch.randn_like(other.lm_head.weight))
    engine = Engine(other, processor, prefix=prefix).start()
    try:
        row = engine.row(first, ("img-a",))
        out = wait_for(engine, dict(row=row, max_new_tokens=6))
        assert out["cached_tokens"] == 0
        alone = generate(other, processor, [processor.prompt_row(first)], max_new_tokens=6)[0]
        assert out["text"] == alone["text"]
    finally:
        engine.stop()


def test_the_prefix_cache_keeps_to_its_budget_and_matches_to_the_token():
    """An entry of 3 blocks and one of 2: the budget holds one; a lookup matches past the last full block
    token by token, and never the last token of the request (its logits are needed)."""
    layer = torch.zeros(1, 1, 3 * BLOCK, 2)
    cache = PrefixCache(budget_bytes=2 * layer.numel() * 4)
    a = np.arange(3 * BLOCK, dtype=np.int64)
    cache.put(a, [(layer, layer)], "root")
    query = a.copy()
    query[2 * BLOCK + 5] = -7
    assert cache.lookup(query, "root")[1] == 2 * BLOCK + 5
    assert cache.lookup(a, "root")[1] == 3 * BLOCK - 1
    assert cache.lookup(a, "other root")[1] == 0
    b = np.arange(100, 100 + 3 * BLOCK, dtype=np.int64)
    cache.put(b, [(layer, layer)], "root")
    assert cache.lookup(a, "root")[1] == 0 and cache.lookup(b, "root")[1] == 3 * BLOCK - 1
    assert cache.stats()["evictions"] == 1 and cache.stats()["bytes"] <= cache.budget
