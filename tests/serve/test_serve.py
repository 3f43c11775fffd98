"""Ray Serve over real HTTP with the official openai client: every modality, streaming, 15+ kinds of
malformed request (4xx, server stays up), auth on and off. Autoscaling up and back down runs in the cluster
tier (tests/cluster/test_cluster.py), with the second replica on the other node."""

import base64
import concurrent.futures
import io
import itertools
import time
import typing
from pathlib import Path

import openai
import pytest
import requests
from PIL import Image

from components.model import build_model, save_model
from tests.conftest import TEST_API_KEY, free_port

pytestmark = pytest.mark.slow
ENDPOINT: dict[str, str] = {}


def png_url(color=(220, 30, 30), size=(120, 80)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny OneVision model as its OneVision stage would export it, with the recipe's video sampling
    changed to 2 fps and at most 5 frames (Serve's old defaults were 1 fps and 32)."""
    import dataclasses

    from components.processor import VideoSampling
    from pipelines.recipes import load_recipe

    recipe = load_recipe("llava_onevision", "tiny", demo_dir="unused")
    stage = dataclasses.replace(recipe.stage("stage2_ov"), video=VideoSampling(fps=2.0, max_frames=5))
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    model, processor = build_model(recipe.model)
    config = stage.processor_config(recipe.model)
    save_model(model, processor.replace(anyres=config.anyres, video=config.video), str(path))
    return str(path)


class _Upstream:
    """A media host on 127.0.0.1: /slow answers after 30 s, /trickle sends a byte a second, /missing is a
    404, /broken a 500, /away redirects off the allow-list, /files/... a test's directory, anything else an
    image."""

    def __init__(self):
        import http.server
        import threading

        image = base64.b64decode(png_url().split(",", 1)[1])
        self.files = None
        """A directory whose files /files/<path> serves (set by a test)."""
        up = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the stdlib's name)
                if self.path.startswith("/slow"):
                    time.sleep(30)
                if self.path == "/trickle":  # a byte every second, for a minute: each read gets data
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    try:
                        for i in range(60):
                            self.wfile.write(image[i : i + 1])
                            self.wfile.flush()
                            time.sleep(1.0)
                    except OSError:
                        pass
                    return
                if self.path == "/missing":
                    return self.send_error(404)
                if self.path == "/broken":
                    return self.send_error(500)
                if self.path.startswith("/files/") and up.files is not None:  # a directory lent by a test
                    path = (up.files / self.path[len("/files/") :]).resolve()
                    if not path.is_file() or up.files.resolve() not in path.parents:
                        return self.send_error(404)
                    body = path.read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.path == "/away":
                    self.send_response(302)
                    self.send_header("Location", "http://example.invalid/x.png")
                    return self.end_headers()
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                try:
                    self.wfile.write(image)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def upstream():
    up = _Upstream()
    yield up
    up.server.shutdown()


@pytest.fixture(scope="module")
def endpoint(ray_local, checkpoint, upstream):
    from ray import serve

    from serve.app import ServeConfig, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    open_config = ServeConfig(  # one replica: lmms-eval's 32 requests in flight meet one queue
        checkpoint=checkpoint,
        min_replicas=1,
        max_replicas=1,
        engine={"max_batch_size": 4},
        replica_cpus=0.25,
        api_key_env="LLAVA_RAY_NO_SUCH_KEY",
        limits={
            "media": {"max_images": 3, "max_image_pixels": 1000 * 1000, "max_image_bytes": 200_000},
            "max_new_tokens": 64,
            "max_body_bytes": 1_000_000,
            "allowed_media_prefixes": [upstream.url + "/"],
            "fetch_timeout_s": 4,
            "fetch_concurrency": 3,
        },
    )
    serve.run(build_app(open_config), name="open", route_prefix="/")
    secured = ServeConfig(
        checkpoint=checkpoint,
        api_key_env="LLAVA_RAY_TEST_API_KEY",
        replica_cpus=0.25,
        min_replicas=1,
        max_replicas=1,
        engine={"max_batch_size": 4, "max_queue": 2},
        limits={"max_new_tokens": 3900},  # long enough to hold the batch while a test looks past its queue
    )
    pair = ServeConfig(  # two replicas behind the conversation router; its load fallback in test_routing.py
        checkpoint=checkpoint,
        replica_cpus=0.25,
        min_replicas=2,
        max_replicas=2,
        engine={"max_batch_size": 4},
        router_imbalance=16,
    )
    serve.run_many(  # started together: replica start-up is most of this module's set-up
        [
            serve.RunTarget(build_app(secured), name="secured", route_prefix="/secured"),
            serve.RunTarget(build_app(pair), name="pair", route_prefix="/pair"),
        ]
    )
    ENDPOINT["url"] = f"http://127.0.0.1:{port}"
    yield ENDPOINT["url"]
    serve.shutdown()


@pytest.fixture(scope="module")
def client(endpoint):
    return openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, content, **kw):
    return client.chat.completions.create(
        model="llava-ray",
        messages=[{"role": "user", "content": content}],
        max_tokens=kw.pop("max_tokens", 6),
        **kw,
    )


def test_models_and_health(client, endpoint):
    assert [m.id for m in client.models.list()] == ["llava-ray"]
    assert requests.get(f"{endpoint}/health").json()["status"] == "ok"


def test_image_question(client):
    out = ask(
        client,
        [
            {"type": "text", "text": "What color is the circle?"},
            {"type": "image_url", "image_url": {"url": png_url()}},
        ],
    )
    assert out.choices[0].message.role == "assistant" and isinstance(out.choices[0].message.content, str)
    assert out.usage.prompt_tokens > 16 and 0 <= out.usage.completion_tokens <= 6
    assert out.choices[0].finish_reason in ("stop", "length")


def test_multi_image_and_text_only(client):
    out = ask(
        client,
        [
            {"type": "image_url", "image_url": {"url": png_url()}},
            {"type": "image_url", "image_url": {"url": png_url((30, 60, 220))}},
            {"type": "text", "text": "Which image is blue?"},
        ],
    )
    assert out.usage.prompt_tokens > 2 * 17
    text = ask(client, "What is two plus three?")
    assert text.usage.prompt_tokens < out.usage.prompt_tokens


def test_video_is_sampled_as_the_checkpoint_was_trained(client, checkpoint, h264):
    """The export records its stage's video sampling (2 fps, at most 5 frames): the endpoint decodes the
    frames that training's DecodeVideo stage decoded for the same clip, and the prompt holds their tokens."""
    import json

    from components.conversation import Turn
    from components.processor import LlavaProcessor, Prompt, VideoSampling
    from pipelines.steps import DecodeVideo, StepConfig

    processor = LlavaProcessor.from_pretrained(checkpoint)
    assert processor.video == VideoSampling(fps=2.0, max_frames=5)
    trained = DecodeVideo(StepConfig(processor=processor.config)).process_row(
        {"sample_id": "clip", "record": json.dumps({"video": "clip.mp4"}), "video_data": h264.read_bytes()}
    )
    clip = processor.sample_video(h264)
    assert trained["frame_indices"] == clip.indices == [0, 7, 14, 21, 29]  # 30 frames at 10 fps
    prompt = Prompt([Turn("user", "<video>\nWhere does it move?")], video_frames=clip.frames)
    url = "data:video/mp4;base64," + base64.b64encode(h264.read_bytes()).decode()
    out = ask(
        client,
        [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Where does it move?"}],
    )
    assert out.usage.prompt_tokens == len(processor.prompt_row(prompt)["input_ids"])
    default = processor.replace(video=VideoSampling()).sample_video(h264)  # 1 fps: 3 frames, fewer tokens
    assert len(default.indices) == 3 and out.usage.prompt_tokens > len(
        processor.prompt_row(Prompt(prompt.turns, video_frames=default.frames))["input_ids"]
    )


def test_greedy_is_deterministic_and_batching_keeps_answers(client):
    content = [{"type": "text", "text": "Describe."}, {"type": "image_url", "image_url": {"url": png_url()}}]
    first = ask(client, content, max_tokens=8).choices[0].message.content
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(lambda _: ask(client, content, max_tokens=8).choices[0].message.content, range(4))
        )
    assert answers == [first] * 4


def test_streaming(client):
    stream = ask(
        client,
        [{"type": "text", "text": "Say something."}, {"type": "image_url", "image_url": {"url": png_url()}}],
        max_tokens=8,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = (
        ask(
            client,
            [
                {"type": "text", "text": "Say something."},
                {"type": "image_url", "image_url": {"url": png_url()}},
            ],
            max_tokens=8,
        )
        .choices[0]
        .message.content
    )
    assert streamed.strip() == whole
    counted = list(
        client.chat.completions.create(
            model="llava-ray",
            messages=[{"role": "user", "content": "Say something."}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.usage is None for c in counted[:-1]) and counted[-1].choices == []
    produced = sum(1 for c in counted[:-1] if c.choices[0].delta.content)  # each holds a token or more
    usage = counted[-1].usage
    assert (
        usage.prompt_tokens > 0
        and usage.completion_tokens >= produced
        and usage.total_tokens == (usage.prompt_tokens + usage.completion_tokens)
    )


def _body(content=None, **extra):
    body = {"model": "llava-ray", "messages": [{"role": "user", "content": content or "hi"}], "max_tokens": 4}
    body.update(extra)
    return body


BAD = [
    ("bad-json", b"{not json", 400, "expected JSON"),
    ("not-an-object", b"[1, 2]", 400, "JSON object"),
    ("unknown-model", _body(model="gpt-9"), 404, "model"),
    ("no-messages", {"model": "llava-ray", "messages": []}, 400, "messages"),
    ("bad-role", {"model": "llava-ray", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    (
        "ends-on-assistant",
        {
            "model": "llava-ray",
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        },
        400,
        "last message",
    ),
    ("max-tokens-zero", _body(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-huge", _body(max_tokens=100000), 400, "max_tokens"),
    ("max-tokens-string", _body(max_tokens="ten"), 400, "max_tokens"),
    ("temperature", _body(temperature=5), 400, "temperature"),
    ("top-p", _body(top_p=0), 400, "top_p"),
    ("n-too-many", _body(n=9), 400, "n: expected a value in [1, 8]"),
    ("tools", _body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools: expected only"),
    ("format-unknown", _body(response_format={"type": "xml"}), 400, "response_format: expected type"),
    (
        "schema-not-an-object",
        _body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": "nope"}}),
        400,
        "response_format: expected json_schema",
    ),
    ("logit-bias", _body(logit_bias={"5": 10}), 400, "logit_bias"),
    (
        "usage-without-stream",
        _body(stream_options={"include_usage": True}),
        400,
        "stream_options: expected only",
    ),
    ("bad-stop", _body(stop=[1, 2]), 400, "stop"),
    (
        "bad-base64",
        _body([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}]),
        400,
        "base64",
    ),
    (
        "not-an-image",
        _body(
            [
                {
                    "type": "image_url",
                    "image_url": {
                        "url": "data:image/png;base64,"
                        + base64.b64encode(b"hello world, not a picture").decode()
                    },
                }
            ]
        ),
        400,
        "expected an image",
    ),
    (
        "huge-image",
        _body([{"type": "image_url", "image_url": {"url": png_url(size=(1200, 1000))}}]),
        413,
        "pixels",
    ),
    (
        "too-many-images",
        _body([{"type": "image_url", "image_url": {"url": png_url()}}] * 4),
        413,
        "at most 3 images",
    ),
    (
        "http-url",
        _body([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]),
        400,
        "allow-listed",
    ),
    (
        "file-url",
        _body([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]),
        400,
        "allow-listed",
    ),
    ("bad-part-type", _body([{"type": "audio_url", "audio_url": {"url": "x"}}]), 400, "type"),
    ("marker-in-text", _body("look: <image>"), 400, "<image>"),
    (
        "bad-video",
        _body(
            [
                {
                    "type": "video_url",
                    "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(b"\x00" * 64).decode()},
                }
            ]
        ),
        400,
        "video",
    ),
    ("prompt-too-long", _body("word " * 4500), 400, "prompt tokens"),
    ("seed-past-int64", _body(seed=2**70), 400, "seed: expected a 64-bit integer"),
    (
        "lone-surrogate",
        b'{"model": "llava-ray", "messages": [{"role": "user", "content": "a \\ud800 b"}]}',
        400,
        "lone surrogate",
    ),
    ("deep-json", b'{"model": "llava-ray", "x": ' + b"[" * 100 + b"]" * 100 + b"}", 400, "nested at most"),
    ("huge-number", b'{"model": "llava-ray", "seed": ' + b"9" * 5000 + b"}", 400, "numbers of ordinary size"),
    (
        "body-too-large",
        b'{"model": "llava-ray", "pad": "' + b"x" * 1_100_000 + b'"}',
        413,
        "at most 1000000 bytes",
    ),
    (
        "bytes-too-large",
        _body([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 400_000}}]),
        413,
        "bytes",
    ),
]


@pytest.mark.parametrize("name, body, status, words", BAD, ids=[b[0] for b in BAD])
def test_malformed_requests_get_4xx_and_the_server_stays_up(endpoint, client, name, body, status, words):
    if isinstance(body, bytes):
        r = requests.post(
            f"{endpoint}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
        )
    else:
        r = requests.post(f"{endpoint}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"], r.text
    assert r.headers["content-type"].startswith("application/json")
    assert ask(client, "still there?", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_framework_errors_use_the_openai_shape(endpoint):
    for method, path, status in (("get", "/v1/nothing-here", 404), ("get", "/v1/chat/completions", 405)):
        r = getattr(requests, method)(f"{endpoint}{path}", timeout=30)
        assert r.status_code == status and r.json()["error"]["code"] == str(status), r.text


def test_a_bad_request_fails_alone_beside_good_ones(client, endpoint):
    """Requests sent at the same moment as bad ones (a seed past int64, a lone surrogate) all get 200; the
    bad ones get their 400: the ingress rejects them before they can join a batch, and the replica runs
    each request of a batch in isolation besides."""
    content = [{"type": "text", "text": "Describe."}, {"type": "image_url", "image_url": {"url": png_url()}}]

    def good(_):
        return ask(client, content, max_tokens=4).choices[0].finish_reason

    bad_bodies = [
        _body(seed=2**70),
        b'{"model": "llava-ray", "messages": [{"role": "user", "content": "\\ud800"}]}',
    ]

    def bad(body):
        kwargs = (
            {"data": body, "headers": {"content-type": "application/json"}}
            if isinstance(body, bytes)
            else {"json": body}
        )
        return requests.post(f"{endpoint}/v1/chat/completions", timeout=60, **kwargs).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(good, i) for i in range(6)]
        bads = [pool.submit(bad, b) for b in bad_bodies]
        assert [f.result() for f in bads] == [400, 400]
        assert all(f.result() in ("stop", "length") for f in goods)


def test_a_slow_upstream_delays_only_its_own_requests(client, endpoint, upstream):
    """Fetches run in their own bounded pool with one deadline each: while slow upstream fetches hang, a
    text-only request answers within 2 s, and each slow fetch ends as a 400 naming the host at the deadline.
    (With media parsed in the ingress's shared default executor, the text-only request would queue
    behind the hanging fetches and miss its 2 s.)"""
    slow = _body(
        [{"type": "image_url", "image_url": {"url": f"{upstream.url}/slow"}}, {"type": "text", "text": "q"}]
    )

    def fetch_slow(_):
        start = time.monotonic()
        r = requests.post(f"{endpoint}/v1/chat/completions", json=slow, timeout=60)
        return r.status_code, r.json()["error"], time.monotonic() - start

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        pending = [pool.submit(fetch_slow, i) for i in range(6)]
        time.sleep(1.0)
        start = time.monotonic()
        assert ask(client, "quick?", max_tokens=2).choices[0].finish_reason in ("stop", "length")
        assert time.monotonic() - start < 2.0
        for status, error, seconds in (f.result() for f in pending):
            assert status == 400 and error["code"] == "media_fetch_failed" and "127.0.0.1" in error["message"]
            assert seconds < 3 * 4 + 10  # the deadline (4 s), behind at most two rounds of the 3-thread pool


def test_an_upstream_that_trickles_is_cut_at_the_fetch_deadline(endpoint, upstream):
    """One deadline for the whole fetch, read by read: an allow-listed upstream that sends a byte every
    second (each read gets data, so no single read times out) is cut at fetch_timeout_s (4 s) with a 400
    naming the host, and the server answers the next request.
    Guards: one deadline for the whole fetch; fails with ``read`` for ``read1`` and no per-read timeout."""
    body = _body(
        [
            {"type": "image_url", "image_url": {"url": f"{upstream.url}/trickle"}},
            {"type": "text", "text": "q"},
        ]
    )
    start = time.monotonic()
    r = requests.post(f"{endpoint}/v1/chat/completions", json=body, timeout=120)
    seconds = time.monotonic() - start
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "media_fetch_failed", r.text
    assert "127.0.0.1" in error["message"] and "within 4" in error["message"], error
    assert seconds < 4 + 3, seconds  # the deadline, plus one read's wait at most and the request's own time
    assert requests.get(f"{endpoint}/health", timeout=10).status_code == 200


@pytest.mark.parametrize(
    "path, code, words",
    [
        ("/missing", "media_fetch_failed", "HTTP 404"),
        ("/broken", "media_fetch_failed", "HTTP 500"),
        ("/away", "url_not_allowed", "example.invalid"),
    ],
)
def test_upstream_failures_and_redirects_are_4xx_naming_the_host(endpoint, upstream, path, code, words):
    body = _body(
        [{"type": "image_url", "image_url": {"url": f"{upstream.url}{path}"}}, {"type": "text", "text": "q"}]
    )
    r = requests.post(f"{endpoint}/v1/chat/completions", json=body, timeout=60)
    assert (
        r.status_code == 400 and r.json()["error"]["code"] == code and words in r.json()["error"]["message"]
    ), r.text
    ok = _body(
        [
            {"type": "image_url", "image_url": {"url": f"{upstream.url}/image.png"}},
            {"type": "text", "text": "q"},
        ]
    )
    assert requests.post(f"{endpoint}/v1/chat/completions", json=ok, timeout=60).status_code == 200


def test_seeded_sampling_streams_the_same_text(client):
    """A seed gives the same sampled text, streamed or not, and another seed other text (so the seed is
    what fixes it, not a sampler that ignores the temperature).
    Guards: the request's seed reaches its sampler; fails with the replica ignoring the seed."""

    def sample(stream: bool, seed: int = 1234) -> str:
        out = client.chat.completions.create(
            model="llava-ray",
            messages=[{"role": "user", "content": "Say something."}],
            max_tokens=8,
            temperature=1.0,
            seed=seed,
            stream=stream,
        )
        if not stream:
            return out.choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in out).strip()

    first = sample(True)
    assert sample(True) == first == sample(False)
    others = {sample(True, seed) for seed in (1, 2, 3)}
    assert others - {first}, (first, others)  # three other seeds cannot all give the same 8 sampled tokens


def test_n_choices_fork_from_one_prefill_and_a_seed_gives_them_again(endpoint):
    """n=3 sampled with a seed, through the openai client on the one-replica app: three choices (indexes 0-2,
    not all alike) from one prefill (the replica's prefilled-token counter moves by the prompt once), the
    same three texts again with the seed, streamed too (each chunk names its choice), choice 0 what n=1
    samples with that seed, and usage counting every choice's tokens.
    Guards: one prefill forked into n sequences, each with its own seeded generator; fails with each
    choice prefilled alone (the counter), or the choices sharing a seed (three equal texts)."""
    from ray import serve

    handle = serve.get_deployment_handle("LlavaModel", app_name="secured")
    client = _secured()
    kw = dict(model="llava-ray", max_tokens=8, temperature=1.0, seed=99)
    messages = [{"role": "user", "content": "Name three things you can see from a window in spring."}]
    before = handle.stats.remote().result()["prefilled_tokens"]
    out = client.chat.completions.create(messages=messages, n=3, **kw)
    prefilled = handle.stats.remote().result()["prefilled_tokens"] - before
    usage = out.usage
    assert prefilled == usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens
    texts = [c.message.content for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2] and len(set(texts)) > 1, texts
    assert [
        c.message.content for c in client.chat.completions.create(messages=messages, n=3, **kw).choices
    ] == texts
    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(messages=messages, n=3, stream=True, **kw):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [t.strip() for t in streamed] == texts
    assert client.chat.completions.create(messages=messages, **kw).choices[0].message.content == texts[0]
    assert usage.completion_tokens > 8  # every choice's tokens, not the first's alone


SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "name": {"type": "string", "maxLength": 10},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["round", "square"]}, "maxItems": 2},
        "seen": {"type": "boolean"},
    },
    "required": ["color", "count", "name", "tags", "seen"],
    "additionalProperties": False,
}


def test_response_format_answers_parse_and_validate(endpoint):
    """json_schema (an enum, a bounded integer and string, an array, a boolean) on a text and an image
    question, greedy and sampled, and json_object on text, streamed and not: every answer ends
    (finish_reason stop), parses, and validates
    against its schema (jsonschema); the openai client's own parse() with a Pydantic model gets the model
    back. Guards: the grammar masking each step's tokens (llguidance); fails with the mask off (free
    text)."""
    import json

    import jsonschema
    import pydantic

    client = _secured()  # its max_tokens bound holds a whole object of this tokenizer's short tokens

    formats = {
        "json_object": ({"type": "json_object"}, {"type": "object"}),
        "json_schema": ({"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA}}, SCHEMA),
    }
    questions = {
        "text": "Describe a shape as JSON.",
        "image": [
            {"type": "text", "text": "Describe the shape as JSON."},
            {"type": "image_url", "image_url": {"url": png_url()}},
        ],
    }
    for (fname, (response_format, schema)), (qname, content) in itertools.product(
        formats.items(), questions.items()
    ):
        # the free object only where the untrained model closes it: its keys may outrun any max_tokens
        # (finish_reason length, the JSON cut, as OpenAI's own); the bounded schema everywhere, sampled too
        if fname == "json_object" and qname == "image":
            continue
        for sampling in ({}, {"temperature": 1.0, "seed": 3})[: 2 if fname == "json_schema" else 1]:
            out = ask(client, content, max_tokens=160, response_format=response_format, **sampling)
            answer = out.choices[0].message.content
            assert out.choices[0].finish_reason == "stop", (fname, qname, answer)
            jsonschema.validate(json.loads(answer), schema)
        streamed = ask(client, content, max_tokens=160, response_format=response_format, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        jsonschema.validate(json.loads(text), schema)

    class Shape(pydantic.BaseModel):
        color: typing.Literal["red", "green", "blue"]
        count: int = pydantic.Field(ge=0, le=9)
        round: bool

    parsed = client.chat.completions.parse(
        model="llava-ray",
        messages=[{"role": "user", "content": "A shape?"}],
        max_tokens=160,
        response_format=Shape,
    )
    assert isinstance(parsed.choices[0].message.parsed, Shape)


def _chats(base_url: str, at_once: int = 8) -> list[list[tuple[str, int, int]]]:
    """8 4-turn chats, ``at_once`` at a time, each about an image of its own, the whole history sent each
    turn (the first four with an x-session-id): per chat, each turn's (replica, prompt tokens, cached
    tokens)."""
    client = openai.OpenAI(base_url=base_url, api_key=TEST_API_KEY, max_retries=0, timeout=120)

    def chat(k: int):
        image = {"type": "image_url", "image_url": {"url": png_url((30 * k, 200 - 20 * k, 90), (96, 64))}}
        history = [{"role": "user", "content": [image, {"type": "text", "text": f"Chat {k}: what is it?"}]}]
        headers = {"x-session-id": f"chat-{k}"} if k < 4 else {}
        turns = []
        for turn in range(4):
            raw = client.chat.completions.with_raw_response.create(
                model="llava-ray", messages=history, max_tokens=4, extra_headers=headers
            )
            out = raw.parse()
            usage = out.usage
            turns.append(
                (
                    raw.headers["x-llava-ray-replica"],
                    usage.prompt_tokens,
                    usage.prompt_tokens_details.cached_tokens,
                )
            )
            history += [
                {"role": "assistant", "content": out.choices[0].message.content or "ok"},
                {"role": "user", "content": f"And turn {turn + 2}?"},
            ]
        return turns

    with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(chat, range(8)))


def _hit_rate(chats) -> float:
    """Turns 2+ that reused the whole of the turn before's prompt."""
    hits = [t[2] >= before[1] for turns in chats for before, t in zip(turns, turns[1:], strict=False)]
    return sum(hits) / len(hits)


def test_every_turn_of_a_chat_finds_its_replica_and_its_cache(endpoint):
    """8 concurrent 4-turn chats against two replicas behind the conversation router (half keyed by an
    x-session-id, half by their opening: text and image hash): every turn of a chat answered by one
    replica, and turns 2+ reused the previous turn's whole prompt at least 90% as often as on one replica.
    Guards: serve/routing.py's ConversationRouter; fails with Serve's default router (about half the
    turns land on the other replica and miss)."""
    single = _hit_rate(_chats(f"{endpoint}/secured/v1", at_once=2))  # one replica; its queue holds 2
    chats = _chats(f"{endpoint}/pair/v1")
    assert all(len({replica for replica, _, _ in turns}) == 1 for turns in chats), chats
    assert _hit_rate(chats) >= 0.9 * single, (single, chats)


def test_auth_on(endpoint):
    secured = openai.OpenAI(base_url=f"{endpoint}/secured/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        secured.chat.completions.create(
            model="llava-ray", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    good = openai.OpenAI(base_url=f"{endpoint}/secured/v1", api_key=TEST_API_KEY, max_retries=0)
    out = good.chat.completions.create(
        model="llava-ray", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert out.choices[0].message.role == "assistant"


def _secured():
    return openai.OpenAI(
        base_url=f"{ENDPOINT['url']}/secured/v1", api_key=TEST_API_KEY, max_retries=0, timeout=120
    )


def test_streams_and_requests_share_the_replicas_batch_at_every_step(endpoint):
    """One replica (max_batch_size 4): two long streams start; while both stream, four short requests
    come and all finish before either stream ends (they joined the running batch at its next decode
    step, and left when done); the two streams' deltas interleave in time (neither waits for the other);
    the replica's decode steps held 3 and 4 sequences at once. With the old replica (a stream ran its own
    generate under the model lock) the second stream started only after the first ended."""
    from ray import serve

    handle = serve.get_deployment_handle("LlavaModel", app_name="secured")
    client = _secured()
    before = len(handle.stats.remote().result()["batch_sizes"])
    arrivals: dict[int, list[float]] = {0: [], 1: []}

    def stream(k):
        out = client.chat.completions.create(
            model="llava-ray",
            messages=[{"role": "user", "content": f"Story {k}."}],
            max_tokens=300,
            stream=True,
        )
        for chunk in out:
            if chunk.choices[0].delta.content:
                arrivals[k].append(time.monotonic())
        return time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(stream, k) for k in (0, 1)]
        deadline = time.monotonic() + 60
        while not (arrivals[0] and arrivals[1]) and time.monotonic() < deadline:
            time.sleep(0.01)
        shorts = list(
            pool.map(lambda _: (ask(client, "Quick?", max_tokens=6), time.monotonic())[1], range(4))
        )
        ends = [f.result() for f in streams]
    assert max(shorts) < min(ends), "a short request waited for a stream to end"
    first_end = min(ends)
    assert min(arrivals[0]) < first_end and min(arrivals[1]) < first_end
    assert len(arrivals[0]) > 20 and len(arrivals[1]) > 20
    sizes = handle.stats.remote().result()["batch_sizes"][before:]
    assert max(sizes) == 4 and sizes.count(3) + sizes.count(4) >= 5, sizes


def test_past_the_queue_a_request_gets_429_and_the_server_stays_up(endpoint):
    """One replica holds 4 sequences and 2 waiting (max_batch_size 4, max_queue 2). Six long streams are
    opened one after another (each call returns once the replica has accepted it: 4 decoding, 2 queued);
    then a request and a stream past the queue each get a 429 in OpenAI's error shape (the openai client's
    RateLimitError: type requests, code rate_limit_exceeded; for the stream a 429, not a broken event
    stream). The six are then closed by their client, and the replica answers again. (Long requests fired
    all at once made this timing-dependent: on a busy machine the first ones finished before the last
    arrived, and the queue had room again.)"""
    client = _secured()
    held = [
        client.chat.completions.create(
            model="llava-ray",
            messages=[{"role": "user", "content": f"Tell a long story, {k}."}],
            max_tokens=3900,
            stream=True,
        )
        for k in range(6)
    ]
    try:
        with pytest.raises(openai.RateLimitError) as refused:
            ask(client, "One more?", max_tokens=4)
        with pytest.raises(openai.RateLimitError) as refused_stream:
            list(ask(client, "Stream?", max_tokens=4, stream=True))
    finally:
        for stream in held:
            stream.close()
    error = refused.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded" and error.type == "requests"
    for e in (error, refused_stream.value):  # when to retry, on every 429
        assert e.response.headers["retry-after"] == "1"
    assert "expected at most 2 waiting requests" in error.message
    assert ask(client, "still there?", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_every_content_form_of_a_question_is_its_training_prompt(client, checkpoint):
    """A two-image question sent interleaved as its text reads, images first, and with our own <image>
    placeholders: each prompt's token ids (vLLM's return_token_ids) are exactly the training text's (the
    checkpoint's processor on that text), and the three answers are one. Guards: one rule that turns
    parts into text; fails with parts joined by newlines (the interleaved form's ids differ)."""
    from components.conversation import Turn
    from components.processor import LlavaProcessor, Prompt

    question = "Which color is the shape in the last image?"
    training = f"Image 1: <image>\nImage 2: <image>\n{question}"
    urls = [png_url((220, 30, 30)), png_url((30, 60, 220))]
    images = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    forms = {
        "interleaved": [
            {"type": "text", "text": "Image 1: "},
            images[0],
            {"type": "text", "text": "\nImage 2: "},
            images[1],
            {"type": "text", "text": f"\n{question}"},
        ],
        "images first": [*images, {"type": "text", "text": question}],
        "placeholders": [{"type": "text", "text": training}, *images],
    }
    processor = LlavaProcessor.from_pretrained(checkpoint)
    pictures = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))) for u in urls]
    expected = processor.prompt_ids(Prompt([Turn("user", training)], pictures)).tolist()
    answers = {
        form: ask(client, parts, max_tokens=6, extra_body={"return_token_ids": True})
        for form, parts in forms.items()
    }
    assert {f: a.model_extra["prompt_token_ids"] for f, a in answers.items()} == dict.fromkeys(
        forms, expected
    )
    assert {f: a.usage.prompt_tokens for f, a in answers.items()} == dict.fromkeys(forms, len(expected))
    assert len({a.choices[0].message.content for a in answers.values()}) == 1


LMMS_TASK = """task: llava_ray_demo
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_messages: !function utils.doc_to_messages
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
"""


def test_lmms_evals_openai_backend_gets_our_own_evaluations_answers(
    endpoint, upstream, checkpoint, demo_dir, tmp_path
):
    """lmms-eval 0.7.3 (the ``lmms`` extra), its ``openai`` chat backend pointed at the endpoint, on every
    item of the demo's held-out split: each question sent as its text reads (text and media parts
    interleaved; the video as a video_url from an allow-listed host, ``pass_video_url``), 8 tokens, greedy,
    32 requests in flight (lmms-eval's own concurrency) against one replica: none failed.
    Every answer equals our own evaluation's (components/evaluation.py, the checkpoint in this process,
    each item alone) on the same item, for text, single image, multi-image, multi-view and video. Fails
    with the endpoint joining parts by newlines."""
    import json
    import shutil

    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    # lmms-eval 0.7.3 patches filelock 3's private filelock._api (a re-entrancy fix for its own dataset
    # loads); this venv has filelock 4 (Ray's and transformers' pin), where that module is gone: skip it
    evaluator._enable_reentrant_filelocks._patched = True

    from components.evaluation import evaluate
    from components.model import load_model

    root, manifests = demo_dir
    records = [json.loads(line) for line in open(manifests["eval"])]
    rows = []
    for record in records:
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else images
        question = next(t["value"] for t in record["conversations"] if t["from"] == "human")
        if record.get("video"):
            question = question.replace("<image>", "<video>")
        rows.append(
            {
                "id": record["id"],
                "question": question,
                "answer": record["answer"],
                "images": [str(root / p) for p in images],
                "video_url": f"{upstream.url}/files/{record['video']}" if record.get("video") else "",
            }
        )
    task_dir = tmp_path / "task"
    shutil.copytree(Path(__file__).parent / "lmms_task", task_dir)
    (task_dir / "split.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task_dir / "llava_ray_demo.yaml").write_text(LMMS_TASK.format(data=task_dir / "split.jsonl"))
    upstream.files = root
    try:
        out = evaluator.simple_evaluate(
            model="openai",
            model_args=f"model=llava-ray,base_url={endpoint}/v1,api_key=unused,"
            "pass_video_url=True,max_retries=1,timeout=120,num_concurrent=32",
            tasks=["llava_ray_demo"],
            task_manager=TaskManager(include_path=str(task_dir)),
            log_samples=True,
            batch_size=1,
        )
    finally:
        upstream.files = None
    theirs = {s["doc"]["id"]: s["filtered_resps"][0].strip() for s in out["samples"]["llava_ray_demo"]}

    model, processor = load_model(checkpoint)
    ours = evaluate(model, processor, records, str(root), max_new_tokens=8, batch_size=1)
    mine = {p["id"]: p["prediction"] for p in ours["predictions"] if not p["probe"]}
    modality = {p["id"]: p["modality"] for p in ours["predictions"]}
    failed = [i for i, t in theirs.items() if "LMMS_EVAL_REQUEST_FAILED" in t]
    assert not failed, failed  # lmms-eval records a request it gave up on as its answer
    assert set(theirs) == set(mine) == {r["id"] for r in records}
    differ = {i: (theirs[i], mine[i], modality[i]) for i in mine if theirs[i] != mine[i]}
    assert not differ, differ
    assert {"text", "image", "multi_image", "video"} <= set(modality.values())
