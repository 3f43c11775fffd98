"""The serving engine (components/engine.py) and its feature cache, without Ray: every request batched at
each decode step and still answered exactly as generate() answers it alone (fp32, CPU)."""

import copy
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from components.conversation import Turn
from components.engine import Engine, EngineConfig, Job, QueueFull, wait_for
from components.feature_cache import FeatureCache
from components.generation import generate
from components.model import ModelSpec, build_model
from components.processor import EncodedImage, EncodedVideo, Prompt, VideoSampling


def _prompts() -> dict[str, Prompt]:
    rng = np.random.default_rng(0)

    def image(w, h):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    return {
        "image": Prompt([Turn("user", "<image>\nWhat color is the shape?")], [image(120, 80)]),
        "multi_image": Prompt(
            [Turn("user", "Image 1: <image>\nImage 2: <image>\nWhich is red?")],
            [image(60, 60), image(90, 40)],
        ),
        "video": Prompt(
            [Turn("user", "<video>\nWhat happens?")],
            video_frames=rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8),
        ),
        "text": Prompt([Turn("user", "What is two plus three?")]),
        "long": Prompt([Turn("user", "Tell me a long story about a circle and a square, please.")]),
    }


DIGESTS = {
    "image": ("img-a",),
    "multi_image": ("img-b", "img-c"),
    "video": ("vid-a",),
    "text": (),
    "long": (),
}
MAX_TOKENS = {"image": 12, "multi_image": 7, "video": 20, "text": 15, "long": 40}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, processor = build_model(ModelSpec())
    return model.eval(), processor


@pytest.fixture(scope="module")
def alone(tiny):
    """generate() on each request alone, greedy: the reference, with transformers' own generate's raw
    logits (log-softmaxed) of each chosen token."""
    model, processor = tiny
    out = {}
    for name, prompt in _prompts().items():
        row = processor.prompt_row(prompt)
        out[name] = generate(model, processor, [row], max_new_tokens=MAX_TOKENS[name])[0]
        batch = processor.collate([row], left_pad=True)
        batch.pop("labels")
        with torch.no_grad():
            hf = model.generate(
                **batch,
                max_new_tokens=MAX_TOKENS[name],
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                eos_token_id=processor.stop_ids,
                pad_token_id=processor.pad_token_id,
            )
        chosen = hf.sequences[0, batch["input_ids"].shape[1] :]
        out[name]["token_logprobs"] = [
            float(torch.log_softmax(step[0].float(), -1)[t])
            for step, t in zip(hf.logits, chosen, strict=False)
        ][: out[name]["completion_tokens"]]
    return out


class Collector:
    def __init__(self):
        self.events, self.done = [], threading.Event()
        self.first_at = self.done_at = None

    def __call__(self, event):
        if self.first_at is None:
            self.first_at = time.monotonic()
        self.events.append(event)
        if "done" in event or "error" in event:
            self.done_at = time.monotonic()
            self.done.set()

    @property
    def result(self) -> dict:
        assert self.done.wait(60), "no result within 60 s"
        return self.events[-1]["done"]

    @property
    def streamed(self) -> str:
        return "".join(e.get("delta", "") for e in self.events)


def test_greedy_in_a_shared_batch_equals_generate_alone_on_every_modality(tiny, alone):
    """Two requests start (one streamed); three more arrive while they decode and join at the next steps;
    each leaves when it reaches its own max_tokens. Every answer (and every stream, joined) equals
    generate() on that request alone, and the joined ones' token log-probabilities equal those of
    transformers' generate alone (1e-4).
    Guards: each row's own positions; fails with the decode step's position_ids left out."""
    model, processor = tiny
    prompts = _prompts()
    engine = Engine(model, processor, EngineConfig(max_batch_size=8))
    try:
        got = {name: Collector() for name in prompts}
        for name in ("long", "image"):
            engine.submit(
                Job(
                    row=processor.prompt_row(prompts[name]),
                    max_new_tokens=MAX_TOKENS[name],
                    emit=got[name],
                    stream=name == "long",
                )
            )
        engine.start()
        while engine.stats()["steps"] < 3:
            time.sleep(0.001)
        for name in ("multi_image", "video", "text"):
            engine.submit(
                Job(
                    row=processor.prompt_row(prompts[name]),
                    max_new_tokens=MAX_TOKENS[name],
                    emit=got[name],
                    stream=name == "video",
                    logprobs=True,
                )
            )
        for name, collector in got.items():
            assert collector.result["text"] == alone[name]["text"], name
            assert collector.result["completion_tokens"] == alone[name]["completion_tokens"], name
            if name in ("multi_image", "video", "text"):  # joined a running batch: padded, own positions
                ours = collector.result["token_logprobs"][: len(alone[name]["token_logprobs"])]
                assert np.allclose(ours, alone[name]["token_logprobs"], atol=1e-4), name
        assert got["long"].streamed.strip() == alone["long"]["text"]
        assert got["video"].streamed.strip() == alone["video"]["text"]
        sizes = engine.stats()["batch_sizes"]
        assert sizes[:3] == [2, 2, 2] and max(sizes) == 5 and sizes[-1] == 1, sizes
    finally:
        engine.stop()


def test_a_finished_sequence_leaves_at_once_and_a_new_one_joins_at_the_next_step(tiny):
    """A 3-token request beside a 30-token one: after its prefill token and 2 decode steps it is gone
    (the batch is 1 from the third step); a request submitted mid-run gets its first token while the long
    one still runs, not after it."""
    model, processor = tiny
    prompts = _prompts()
    engine = Engine(model, processor)
    try:
        long, short, late = Collector(), Collector(), Collector()
        engine.submit(Job(row=processor.prompt_row(prompts["long"]), max_new_tokens=30, emit=long))
        engine.submit(Job(row=processor.prompt_row(prompts["text"]), max_new_tokens=3, emit=short))
        engine.start()
        assert short.result["completion_tokens"] == 3
        while engine.stats()["steps"] < 10:
            time.sleep(0.001)
        engine.submit(Job(row=processor.prompt_row(prompts["text"]), max_new_tokens=2, emit=late))
        assert late.result["completion_tokens"] == 2 and long.result["completion_tokens"] == 30
        assert late.done_at < long.done_at, "the late request waited for the running one"
        sizes = engine.stats()["batch_sizes"]
        assert sizes[:2] == [2, 2] and sizes[2] == 1, sizes
        assert 2 in sizes[3:], f"the late request never shared a step with the long one: {sizes}"
        assert len(sizes) == 29, (
            sizes
        )  # the long one's 29 decode steps; the late one's one step was among them
    finally:
        engine.stop()


def test_a_seeded_sample_is_the_same_whatever_it_is_batched_with(tiny):
    """temperature 0.9, top_p 0.8: seed 7 alone, then seeds 7 and 8 submitted together beside two greedy
    requests, sharing decode steps (each one's steps, counted by the engine when it emits, overlap): seed
    7 gives the same text as alone, and seed 8 another text.
    Guards: a generator per request; fails with the sampler drawing from torch's global one."""
    model, processor = tiny
    prompts = _prompts()
    sampled = dict(temperature=0.9, top_p=0.8)
    engine = Engine(model, processor).start()
    row = processor.prompt_row(prompts["text"])
    try:
        alone_text = wait_for(engine, dict(row=row, max_new_tokens=20, seed=7, **sampled))
        others = [Collector(), Collector()]
        for name, collector in zip(("long", "image"), others, strict=True):
            engine.submit(Job(row=processor.prompt_row(prompts[name]), max_new_tokens=25, emit=collector))
        seeded = {seed: StepCollector(engine) for seed in (7, 8)}
        for seed, collector in seeded.items():
            engine.submit(Job(row=row, max_new_tokens=20, emit=collector, stream=True, seed=seed, **sampled))
        assert seeded[7].result["text"] == alone_text["text"]
        assert seeded[8].result["text"] != alone_text["text"]
        first, second = (set(range(c.steps[0], c.steps[-1] + 1)) for c in seeded.values())
        assert len(first & second) >= 5, (seeded[7].steps, seeded[8].steps)  # decoded in the same steps
        [c.result for c in others]
    finally:
        engine.stop()


class StepCollector(Collector):
    """A Collector that also notes the engine's decode step at each event."""

    def __init__(self, engine):
        super().__init__()
        self.engine, self.steps = engine, []

    def __call__(self, event):
        self.steps.append(self.engine.steps)
        super().__call__(event)


def test_stop_strings_end_the_answer_and_never_reach_the_stream(tiny, alone):
    """A stop string taken from the middle of the greedy answer: the answer ends before it
    (finish_reason stop), and the streamed deltas, joined, never contain any part of it."""
    model, processor = tiny
    prompts = _prompts()
    reference = alone["long"]["text"]
    stop = reference[len(reference) // 2 : len(reference) // 2 + 3]
    engine = Engine(model, processor).start()
    try:
        got = Collector()
        engine.submit(
            Job(
                row=processor.prompt_row(prompts["long"]),
                max_new_tokens=MAX_TOKENS["long"],
                emit=got,
                stream=True,
                stop=(stop,),
            )
        )
        result = got.result
        assert result["finish_reason"] == "stop"
        assert result["text"] == reference[: reference.index(stop)].strip()
        assert stop not in got.streamed and got.streamed.strip() == result["text"]
    finally:
        engine.stop()


def test_the_queue_is_bounded_and_a_cancelled_request_leaves(tiny):
    """max_batch_size 1, max_queue 2: one request has the batch's place, two wait, a fourth raises
    QueueFull (the endpoint's 429); a cancelled request, waiting or active, is dropped without an answer
    and frees its place."""
    model, processor = tiny
    row = processor.prompt_row(_prompts()["text"])
    engine = Engine(model, processor, EngineConfig(max_batch_size=1, max_queue=2))  # not started: all wait
    first = Job(row=row, max_new_tokens=5, emit=Collector())
    second = Job(row=row, max_new_tokens=5, emit=Collector())
    engine.submit(first)
    engine.submit(second)
    engine.submit(Job(row=row, max_new_tokens=5, emit=Collector()))
    with pytest.raises(QueueFull, match="expected at most 2 waiting requests"):
        engine.submit(Job(row=row, max_new_tokens=5, emit=Collector()))
    second.cancelled = True
    engine.start()
    try:
        assert first.emit.result["completion_tokens"] == 5
        time.sleep(0.2)
        assert second.emit.events == [] and engine.stats()["waiting"] == 0
        running = Job(row=row, max_new_tokens=500, emit=Collector())
        engine.submit(running)
        while engine.stats()["active"] == 0:
            time.sleep(0.001)
        running.cancelled = True
        while engine.stats()["active"]:
            time.sleep(0.001)
        assert not any("done" in e for e in running.emit.events)
    finally:
        engine.stop()


def _fresh_features(model, processor, prompt: Prompt) -> list[torch.Tensor]:
    """Each medium's projected features, encoded now by transformers' own get_*_features."""
    batch = processor.collate([processor.prompt_row(prompt)], left_pad=True)
    inner = model.model
    with torch.no_grad():
        if prompt.video_frames is not None:
            out = inner.get_video_features(batch["pixel_values_videos"], return_dict=True)
        else:
            out = inner.get_image_features(
                batch["pixel_values"],
                batch["image_sizes"],
                batch_num_images=batch.get("batch_num_images"),
                return_dict=True,
            )
    return list(out.pooler_output)


def test_cached_features_skip_tiling_and_the_tower_and_answer_the_same(tiny, alone, monkeypatch):
    """Each media request twice through an engine with a feature cache: the first time a miss (tiled and
    encoded, its features kept, equal to a fresh encode by transformers), the second a hit whose row
    carries the features, its media still as bytes (decoding, tiling and the tower not called: all made
    to raise), and both answers' token log-probs equal generate() alone within 1e-4. The first of the
    two images asked about alone is another key (OneVision tiles a lone image, not one of several): a
    miss, with other features.
    Guards: the feature cache's keys and the features it scatters; fails with 'alone' left out of the key
    (the lone image's row carries the pair's features) or the cached features of another medium."""
    model, processor = tiny
    prompts = _prompts()
    cache = FeatureCache(64 << 20)
    engine = Engine(model, processor, features=cache).start()

    def answer(row, name):
        out = wait_for(engine, dict(row=row, max_new_tokens=MAX_TOKENS[name], logprobs=True))
        assert out["text"] == alone[name]["text"], name
        np.testing.assert_allclose(out["token_logprobs"], alone[name]["token_logprobs"], atol=1e-4)

    try:
        for name in ("image", "multi_image", "video"):
            row = engine.row(prompts[name], DIGESTS[name])
            assert "features" not in row
            answer(row, name)
            kept = [cache.entries[k] for k in row["feature_keys"][1]]
            for got, fresh in zip(kept, _fresh_features(model, processor, prompts[name]), strict=True):
                torch.testing.assert_close(got, fresh, rtol=0, atol=1e-6)
        assert cache.stats()["entries"] == 4  # one per medium
        with monkeypatch.context() as m:
            m.setattr(type(processor), "media", lambda *a, **k: pytest.fail("tiled on a hit"))
            m.setattr(
                type(model.model.vision_tower), "forward", lambda *a, **k: pytest.fail("encoded on a hit")
            )
            m.setattr(EncodedImage, "decode", lambda *a: pytest.fail("decoded on a hit"))
            m.setattr(VideoSampling, "read", lambda *a, **k: pytest.fail("decoded on a hit"))
            for name in ("image", "multi_image", "video"):
                row = engine.row(_encoded(prompts[name]), DIGESTS[name])
                assert "features" in row, name
                answer(row, name)
        pair = prompts["multi_image"]
        lone = Prompt([Turn("user", "<image>\nWhat color is the shape?")], pair.images[:1])
        row = engine.row(lone, DIGESTS["multi_image"][:1])
        assert "features" not in row  # the pair's first image, alone: not the features it had in the pair
        out = wait_for(engine, dict(row=row, max_new_tokens=8))
        assert (
            out["text"]
            == generate(model, processor, [processor.prompt_row(lone)], max_new_tokens=8)[0]["text"]
        )
        assert cache.stats()["hits"] == 3
    finally:
        engine.stop()


def _encoded(prompt: Prompt) -> Prompt:
    """The prompt as the ingress sends media it has seen before: file bytes and sizes, not pixels."""
    import io

    images = []
    for image in prompt.images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        images.append(EncodedImage(buf.getvalue(), image.width, image.height))
    video = (
        None
        if prompt.video_frames is None
        else EncodedVideo(b"not decoded on a hit", len(prompt.video_frames))
    )
    return Prompt(prompt.turns, images, video, prompt.id)


def test_a_new_export_never_meets_an_old_ones_features(tiny, monkeypatch):
    """Two checkpoints (different weights) share one cache: the second, asked about the image the first
    has cached, misses and answers as it does alone.
    Guards: the weights' fingerprint in the feature key; fails with it left out."""
    model_a, processor = tiny
    model_b = copy.deepcopy(model_a)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model_b.named_parameters():
            if "vision_tower" in name or "multi_modal_projector" in name:
                p.add_(0.05 * torch.randn_like(p))
    prompt = _prompts()["image"]
    reference = generate(model_b, processor, [processor.prompt_row(prompt)], max_new_tokens=12)[0]["text"]
    cache = FeatureCache(64 << 20)
    for model in (model_a, model_b):
        engine = Engine(model, processor, features=cache).start()
        try:
            out = wait_for(engine, dict(row=engine.row(prompt, ("same",)), max_new_tokens=12))
        finally:
            engine.stop()
    assert cache.stats()["hits"] == 0 and cache.stats()["entries"] == 2
    assert out["text"] == reference


def test_the_cache_keeps_to_its_budget_least_recently_used_out():
    cache = FeatureCache(3 * 4 * 100)  # three entries of 100 float32
    keys = cache.keys(("a", "b", "c", "d"), "image", {}, "w")
    for k in keys[:3]:
        cache.put([k], [torch.zeros(100)])
    assert cache.get([keys[0]]) is not None  # a is now the most recent
    cache.put([keys[3]], [torch.zeros(100)])  # b goes
    assert cache.get([keys[1]]) is None and cache.get([keys[0]]) is not None
    assert cache.stats()["bytes"] <= 1200 and cache.stats()["evictions"] == 1
    assert cache.keys(("a",), "image", {}, "w") != cache.keys(("a",), "image", {}, "other weights")
    assert cache.keys(("a",), "image", {"anyres": 1}, "w") != cache.keys(("a",), "image", {}, "w")


def test_the_decode_batch_keeps_one_row_per_sequence_and_says_when_it_does_not(tiny):
    """Guards: DecodeBatch's invariant (cache, mask, positions and last tokens: one row per sequence, the
    cache as wide as the mask); fails with check() a no-op."""
    from components.decode_batch import DecodeBatch
    from components.prefill import Prefill

    model, processor = tiny
    prompts, prefill, batch = _prompts(), Prefill(model, processor), DecodeBatch(model.device)
    with torch.no_grad():
        for name in ("text", "image", "long"):
            cache, mask, _, _ = prefill(processor.prompt_row(prompts[name]))
            batch.concatenate(name, cache, mask)
        batch.forward(model)
        batch.filter([0, 2])
    assert batch.sequences == ["text", "long"] and batch.mask.shape[0] == batch.positions.shape[0] == 2
    assert batch.cache.layers[0].keys.shape[2] == batch.mask.shape[1]
    batch.positions = batch.positions[:1]  # one structure loses a row
    with pytest.raises(AssertionError, match="expected 2 rows everywhere"):
        batch.check()
