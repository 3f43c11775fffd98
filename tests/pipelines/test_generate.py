"""Generation through Ray Data against real HTTP endpoints on 127.0.0.1: a fault injector (429, 500,
timeouts) for retries and resume, and the output accepted by preprocessing unchanged."""

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from components.instruct import ImageAnnotations
from pipelines.generate import GenerateConfig, generate
from pipelines.preprocess import PreprocessConfig, preprocess
from tests.conftest import free_port

pytestmark = pytest.mark.slow

RESPONSES = {
    "conversation": "Question: What shape is shown?\nAnswer: A {color} {shape}.\n"
    "Question: Is there anything else?\nAnswer: No, only the {shape}.",
    "detail": "The image shows one large {color} {shape} on a plain light gray background "
    "with nothing else in it.",
    "reasoning": "Question: Why is the {shape} easy to see?\n"
    "Answer: Its {color} color stands out against the light gray background.",
}


class FaultyTeacher:
    """An OpenAI-compatible chat endpoint that fails on purpose: per image, a 429, a 500, a slow reply."""

    def __init__(self, faults=True, down_for=()):
        self.calls = Counter()
        self.faults = faults
        self.down_for = set(down_for)  # image ids answered 503 every time (an outage)
        self.lock = threading.Lock()
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                system = body["messages"][0]["content"]
                annotations = body["messages"][-1]["content"]
                kind = (
                    "conversation"
                    if "conversation" in system
                    else "detail"
                    if "paragraph" in system
                    else "reasoning"
                )
                key = (annotations, kind)
                with teacher.lock:
                    teacher.calls[key] += 1
                    n = teacher.calls[key]
                color, shape = annotations.split("\n")[0].split(" ")[1:3]
                if any(f"id={i};" in annotations for i in teacher.down_for):
                    return self._send(503, {"error": "down"})
                if teacher.faults and n == 1:
                    return self._send(429, {"error": "slow down"}, {"Retry-After": "0"})
                if teacher.faults and n == 2:
                    return self._send(500, {"error": "boom"})
                if teacher.faults and n == 3:
                    time.sleep(1.5)  # past the client's timeout
                text = RESPONSES[kind].format(color=color, shape=shape.rstrip("."))
                self._send(
                    200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
                )

            def _send(self, status, body, headers=None):
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self):
        self.server.shutdown()


def annotations(demo_dir):
    root, manifests = demo_dir
    out = []
    for line in open(manifests["stage1_captions"]):
        r = json.loads(line)
        caption = r["conversations"][1]["value"]
        out.append(
            ImageAnnotations(
                r["id"], r["image"], [caption, f"id={r['id']};"], [("shape", [0.1, 0.1, 0.8, 0.8])]
            )
        )
    return out


def test_retries_then_resume_generates_only_missing_ids(demo_dir, ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-test-secret")
    ctxs = annotations(demo_dir)
    down = {c.image_id for c in ctxs[::2]}
    teacher = FaultyTeacher(faults=True, down_for=down)
    config = GenerateConfig(
        endpoint=teacher.url,
        model="teacher",
        out=str(tmp_path / "gen"),
        timeout_s=1.0,
        max_retries=4,
        backoff_s=0.05,
        api_key_env="TEACHER_KEY",
        rate_limit_rps=200,
    )
    first = generate(ctxs, config)
    n_up = (len(ctxs) - len(down)) * 3
    assert first["generated"] == n_up and first["failed"] == len(down) * 3 and first["rejected"] == 0
    assert first["retried_requests"] >= n_up * 3  # every item met a 429, a 500 and a timeout first
    log = (tmp_path / "gen" / "summary.json").read_text()
    assert "sk-test-secret" not in log
    teacher.close()

    healthy = FaultyTeacher(faults=False)
    second = generate(ctxs, GenerateConfig(**{**config.__dict__, "endpoint": healthy.url}))
    assert second["requested"] == len(down) * 3 and second["skipped_done"] == n_up
    assert sum(healthy.calls.values()) == len(down) * 3, "only the missing ids were asked for"
    assert second["total_records"] == len(ctxs) * 3
    records = [json.loads(line) for line in open(tmp_path / "gen" / "llava_instruct.jsonl")]
    assert len({r["id"] for r in records}) == len(ctxs) * 3
    healthy.close()

    root, _ = demo_dir
    for name in ("llava_instruct.jsonl", "brief.jsonl"):
        summary = preprocess(
            PreprocessConfig(manifest=str(tmp_path / "gen" / name), media_root=str(root)),
            str(tmp_path / f"pre-{name}"),
        )
        assert summary["rejected"] == 0 and summary["accepted"] == summary["read"] > 0


def test_plumbing_against_the_project_serve_app(demo_dir, ray_local, tmp_path):
    """The tiny model as a teacher: its text is gibberish, so outputs land in rejects with the raw text:
    at least one reject, one line per rejected output, each with its raw text and one "expected"."""
    from ray import serve

    from components.model import ModelSpec, build_model, save_model
    from serve.app import ServeConfig, build_app

    model, processor = build_model(ModelSpec())
    save_model(model, processor, str(tmp_path / "hf"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(
            ServeConfig(
                checkpoint=str(tmp_path / "hf"), replica_cpus=0.25, limits={"max_prompt_tokens": 8192}
            )
        ),
        name="teacher",
        route_prefix="/",
    )
    try:
        ctxs = annotations(demo_dir)[:3]
        config = GenerateConfig(
            endpoint=f"http://127.0.0.1:{port}/v1",
            model="llava-ray",
            out=str(tmp_path / "gen"),
            max_new_tokens=16,
            types=["conversation", "detail"],
            timeout_s=60,
        )
        summary = generate(ctxs, config)
        assert summary["failed"] == 0 and summary["generated"] + summary["rejected"] == 6
        rejects = [json.loads(line) for line in open(tmp_path / "gen" / "rejects.jsonl")]
        assert len(rejects) == summary["rejected"] > 0  # gibberish is recorded, not dropped
        assert all(isinstance(r["raw"], str) and r["error"].count("expected") == 1 for r in rejects)
    finally:
        serve.shutdown()  # the serve tier starts its own Serve on its own port
