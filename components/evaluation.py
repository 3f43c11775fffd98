"""Evaluation as data (lmms-eval style): tasks, scorers, and a per-modality report with chance levels.

A task selects held-out records (by their ``task`` field), prompts with the first user turn, and
scores the greedy answer: exact match for short answers, the option letter for multiple choice.
"""

from __future__ import annotations

import json
import re
import string
from collections import defaultdict
from dataclasses import dataclass

from components.conversation import Turn, parse_sample
from components.generation import generate, load_media
from components.processor import LlavaProcessor, Prompt


@dataclass(frozen=True)
class EvalTask:
    name: str
    modality: str
    """image, multi_image, video or text."""
    scorer: str
    """exact_match or option_letter."""
    record_task: str
    """The records' ``task`` field this task selects."""


DEMO_TASKS = (
    EvalTask("si_color", "image", "exact_match", "color"),
    EvalTask("si_shape_mc", "image", "option_letter", "shape_mc"),
    EvalTask("mi_more_circles", "multi_image", "exact_match", "more_circles"),
    EvalTask("mi_what_changed", "multi_image", "exact_match", "what_changed"),
    EvalTask("video_direction", "video", "exact_match", "direction"),
    EvalTask("video_shape_mc", "video", "option_letter", "video_shape_mc"),
    EvalTask("text_qa", "text", "exact_match", "text"),
)

_OPTION = re.compile(r"^\s*\(?([A-Z])[\).:\s]|^\s*\(?([A-Z])\)?\s*$")


def normalize(text: str) -> str:
    text = text.strip().lower()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def score(scorer: str, prediction: str, answer: str) -> bool:
    if scorer == "exact_match":
        return normalize(prediction) == normalize(answer)
    if scorer == "option_letter":
        m = _OPTION.match(prediction)
        letter = (m.group(1) or m.group(2)) if m else None
        return letter == answer.strip().upper()
    raise ValueError(f"scorer: expected exact_match or option_letter, found {scorer!r}")


def chance(scorer: str, prompt: str, answers: list[str]) -> float:
    """Chance of one answer: 1/options for multiple choice, 1/distinct answers of the task otherwise."""
    if scorer == "option_letter":
        options = len(re.findall(r"^[A-Z]\. ", prompt, flags=re.M))
        return 1.0 / max(1, options)
    return 1.0 / max(1, len({normalize(a) for a in answers}))


def evaluate(
    model,
    processor: LlavaProcessor,
    records: list[dict],
    media_root: str,
    *,
    tasks=DEMO_TASKS,
    max_new_tokens: int = 8,
    batch_size: int = 8,
) -> dict:
    """Accuracy per task, per modality, and over single-image questions, with chance beside each. Only
    what the architecture takes is asked (LLaVA and LLaVA-1.5 get no video); the rest is reported as
    skipped, with the reason."""
    model.eval()
    by_task = {t.record_task: t for t in tasks}
    items, skipped = [], defaultdict(int)
    for record in records:
        task = by_task.get(record.get("task"))
        if task is None:
            continue
        if task.modality == "video" and not processor.arch.takes_video:
            skipped[task.name] += 1
            continue
        sample = parse_sample(record)
        first_user = next(t for t in sample.turns if t.role == "user")
        answer = record.get("answer") or next(t.text for t in sample.turns if t.role == "assistant")
        images, frames = load_media(processor, sample.images, sample.video, media_root)
        prompt = Prompt([Turn("user", first_user.text)], images, frames, sample.id)
        items.append((task, sample.id, first_user.text, answer, processor.prompt_row(prompt)))
    answers_by_task = defaultdict(list)
    for task, _, _, answer, _ in items:
        answers_by_task[task.name].append(answer)
    results = []
    # batch rows of one modality together (video frame counts must match inside a batch)
    for modality in ("image", "multi_image", "video", "text"):
        group = [it for it in items if it[4]["modality"] == modality]
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            outs = generate(model, processor, [it[4] for it in chunk], max_new_tokens=max_new_tokens)
            for (task, sid, prompt_text, answer, _), out in zip(chunk, outs, strict=True):
                results.append({
                    "id": sid, "task": task.name, "modality": task.modality, "prediction": out["text"],
                    "answer": answer, "correct": score(task.scorer, out["text"], answer),
                    "chance": chance(task.scorer, prompt_text, answers_by_task[task.name]),
                })  # fmt: skip
    out = report(results)
    out["skipped"] = {
        name: {"n": n, "reason": f"{processor.arch.name} takes no video"}
        for name, n in sorted(skipped.items())
    }
    return out


def report(results: list[dict]) -> dict:
    def summarize(rows):
        n = len(rows)
        return {
            "n": n,
            "accuracy": sum(r["correct"] for r in rows) / n if n else 0.0,
            "chance": sum(r["chance"] for r in rows) / n if n else 0.0,
        }

    out = {"tasks": {}, "modalities": {}, "predictions": results}
    for key, field in (("tasks", "task"), ("modalities", "modality")):
        groups = defaultdict(list)
        for r in results:
            groups[r[field]].append(r)
        out[key] = {k: summarize(v) for k, v in sorted(groups.items())}
    out["overall"] = summarize(results)
    return out


def format_report(rep: dict) -> str:
    lines = [f"{'task':18s} {'n':>4s} {'accuracy':>9s} {'chance':>7s}"]
    for name, s in {**rep["tasks"], "ALL": rep["overall"]}.items():
        lines.append(f"{name:18s} {s['n']:4d} {s['accuracy']:9.3f} {s['chance']:7.3f}")
    for name, s in rep.get("skipped", {}).items():
        lines.append(f"{name:18s} {s['n']:4d}   skipped: {s['reason']}")
    return "\n".join(lines)


def read_records(path_text: str) -> list[dict]:
    return [json.loads(line) for line in path_text.splitlines() if line.strip()]
