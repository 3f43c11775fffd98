"""`make demo`: the whole OneVision curriculum on the embedded default, evaluated, served and queried.

1. the demo world and the tiny models; 2. a local Ray (2 CPUs); 3. the 4 stages with DeepSpeed on
2 CPU workers, checkpoints in local object storage, tracking in a local MLflow store; 4. evaluation
after each stage; 5. the final model on Ray Serve; 6. one image and one video question through the
OpenAI-compatible endpoint; 7. a summary, and how to look further.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time

import openai
import ray
from ray import serve

from components import storage
from components.tracking import TrackingConfig, audit_pipeline_run
from pipelines.dag import PipelineConfig, format_summary, run_pipeline
from pipelines.recipes import ensure_demo_data
from serve.app import ServeConfig, build_app


def _data_url(path: str, mime: str) -> str:
    with open(path, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode()


def _first(records: list[dict], task: str) -> dict:
    return next(r for r in records if r.get("task") == task)


def run_demo(out: str, num_cpus: int = 2, seed: int = 0) -> int:
    start = time.monotonic()
    out = os.path.abspath(out)
    data = ensure_demo_data(os.path.join(out, "data"))
    tracking = os.path.join(out, "mlflow")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    config = PipelineConfig(
        recipe="llava_onevision",
        profile="tiny",
        storage=os.path.join(out, "runs"),
        run_id="demo" if seed == 0 else f"demo-seed{seed}",
        tracking_uri=tracking,
        demo_dir=data,
        seed=seed,
    )
    summary = run_pipeline(config)
    trained = time.monotonic() - start
    answers = _ask_the_endpoint(summary["final_model"], data)
    problems = audit_pipeline_run(TrackingConfig(uri=tracking), summary)
    _report(summary, answers, out, tracking, trained, time.monotonic() - start)
    storage.write_text(
        os.path.join(out, "demo_summary.json"), json.dumps({"summary": summary, "answers": answers}, indent=1)
    )
    print(
        "\nMLflow store: "
        + (
            "every run ended, one run per stage with its mixture manifest, the registered "
            "version linked to its run and files"
            if not problems
            else "NOT as expected"
        )
    )
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


def _ask_the_endpoint(checkpoint: str, data: str) -> list[tuple]:
    """The final model on Ray Serve, asked one image and one video question with the official client."""
    port = _port(8000)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(ServeConfig(checkpoint=checkpoint, replica_cpus=0.5)), name="llava", route_prefix="/")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    records = [json.loads(line) for line in open(os.path.join(data, "eval.jsonl"))]
    image_q, video_q = _first(records, "color"), _first(records, "end_color")
    answers = []
    for record, part in (
        (
            image_q,
            {
                "type": "image_url",
                "image_url": {"url": _data_url(os.path.join(data, record_path(image_q)), "image/png")},
            },
        ),
        (
            video_q,
            {
                "type": "video_url",
                "video_url": {"url": _data_url(os.path.join(data, video_q["video"]), "video/mp4")},
            },
        ),
    ):
        question = record["conversations"][0]["value"].replace("<image>\n", "").replace("<video>\n", "")
        reply = client.chat.completions.create(
            model="llava-ray",
            messages=[{"role": "user", "content": [part, {"type": "text", "text": question}]}],
            max_tokens=8,
        )
        answers.append(
            (record["id"], question.splitlines()[0], record["answer"], reply.choices[0].message.content)
        )
    serve.shutdown()
    return answers


def _report(
    summary: dict, answers: list[tuple], out: str, tracking: str, trained: float, total: float
) -> None:
    print("\n" + "=" * 100)
    print(
        f"llava-ray demo: OneVision curriculum (tiny) in {trained / 60:.1f} min, total {total / 60:.1f} min"
    )
    print(format_summary(summary))
    print(
        "\nheld-out accuracy per modality, after each stage (reversed: the images or frames in reverse order,"
    )
    print("scored against the answers that order implies):")
    print(modality_table(summary["stages"]))
    print("\nthrough the OpenAI-compatible endpoint:")
    for sid, question, expected, got in answers:
        print(f"  {sid}: {question!r} -> {got!r} (expected {expected!r})")
    db = os.path.join(tracking, "mlflow.db")
    print(
        f"\nMLflow UI:   .venv/bin/mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000"
    )
    print(
        f"Serve it:    .venv/bin/llava-ray serve --checkpoint {summary['final_model']} --config "
        "serve/serve.yaml"
    )
    print(
        'Query it:    curl -s http://127.0.0.1:8000/v1/chat/completions -H "content-type: application/json" '
        "\\\n"
        '               -d \'{"model": "llava-ray", '
        '"messages": [{"role": "user", "content": "What is two plus three?"}]}\''
    )
    print(f"Run state:   .venv/bin/llava-ray status demo --storage {os.path.join(out, 'runs')}")


def modality_table(stages: list[dict]) -> str:
    """accuracy / chance per modality (and per reversed probe) in each stage's evaluation."""
    columns = ["image", "multi_image", "video", "text", "multi_image reversed", "video reversed"]
    lines = [f"{'stage':12s} " + " ".join(f"{c:>21s}" for c in columns)]
    for record in stages:
        ev = record.get("eval") or {}
        cells = []
        for column in columns:
            name, _, probe = column.partition(" ")
            s = (ev.get("probes") if probe else ev.get("modalities", {})) or {}
            s = s.get(name)
            cells.append(f"{s['accuracy']:.3f} / {s['chance']:.3f}" if s else "-")
        lines.append(f"{record['stage']:12s} " + " ".join(f"{c:>21s}" for c in cells))
    return "\n".join(lines)


def _port(preferred: int) -> int:
    """The preferred port when it is free on 127.0.0.1, else any free one."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def record_path(record: dict) -> str:
    image = record["image"]
    return image if isinstance(image, str) else image[0]
