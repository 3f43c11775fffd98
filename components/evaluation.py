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

import numpy as np

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
    EvalTask("mi_last_color", "multi_image", "exact_match", "last_color"),
    EvalTask("mi_first_color", "multi_image", "exact_match", "first_color"),
    EvalTask("mv_color", "multi_image", "exact_match", "multiview"),
    EvalTask("video_end_color", "video", "exact_match", "end_color"),
    EvalTask("video_start_color", "video", "exact_match", "start_color"),
    EvalTask("text_qa", "text", "exact_match", "text"),
)

_OPTION = re.compile(r"^\s*\(?([A-Z])[\).:\s]|^\s*\(?([A-Z])\)?\s*$")


ANSWER_TOKENS = 8
"""Tokens an evaluation answer may take: the answers are a word or an option's letter."""


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


@dataclass
class _Item:
    task: EvalTask
    id: str
    question: str
    answer: str
    row: dict
    probe: bool = False
    """Asked again with the images (or frames) in reverse order; ``answer`` is then the record's
    ``probe_answer``."""


def evaluate(
    model,
    processor: LlavaProcessor,
    records: list[dict],
    media_root: str,
    *,
    tasks=DEMO_TASKS,
    max_new_tokens: int = ANSWER_TOKENS,
    batch_size: int = 8,
) -> dict:
    """Accuracy per task and per modality, with chance beside each; then the plumbing probes: every record
    with a ``probe_answer`` is asked again with its images or video frames reversed, and scored against
    that answer (a model that reads the order gets them right; one that guesses does not). Only what the
    architecture takes is asked (LLaVA and LLaVA-1.5 get no video); the rest is reported as skipped."""
    model.eval()
    items, skipped = _items(processor, records, media_root, tasks)
    answers_by_task = defaultdict(list)
    for item in items:
        if not item.probe:
            answers_by_task[item.task.name].append(item.answer)
    results = []
    # batch rows of one modality together (video frame counts must match inside a batch)
    for modality in ("image", "multi_image", "video", "text"):
        group = [it for it in items if it.row["modality"] == modality]
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            outs = generate(model, processor, [it.row for it in chunk], max_new_tokens=max_new_tokens)
            for it, out in zip(chunk, outs, strict=True):
                results.append(
                    {
                        "id": it.id,
                        "task": it.task.name,
                        "modality": it.task.modality,
                        "prediction": out["text"],
                        "answer": it.answer,
                        "correct": score(it.task.scorer, out["text"], it.answer),
                        "probe": it.probe,
                        "chance": chance(it.task.scorer, it.question, answers_by_task[it.task.name]),
                    }
                )
    out = report([r for r in results if not r["probe"]])
    out["probes"] = report([r for r in results if r["probe"]])["modalities"]
    out["predictions"] = results
    out["skipped"] = {
        name: {"n": n, "reason": f"{processor.arch.name} takes no video"}
        for name, n in sorted(skipped.items())
    }
    return out


def _items(processor: LlavaProcessor, records: list[dict], media_root: str, tasks) -> tuple[list, dict]:
    """(the questions to ask, each with its prompt row, then its reversed-order probe where it has one;
    per task, how many records were skipped because the architecture takes no video)."""
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
        question = next(t for t in sample.turns if t.role == "user").text
        answer = record.get("answer") or next(t.text for t in sample.turns if t.role == "assistant")
        images, frames = load_media(processor, sample.images, sample.video, media_root)
        prompt = Prompt([Turn("user", question)], images, frames, sample.id)
        items.append(_Item(task, sample.id, question, answer, processor.prompt_row(prompt)))
        if record.get("probe_answer") is not None:
            reversed_frames = None if frames is None else np.ascontiguousarray(frames[::-1])
            flipped = Prompt([Turn("user", question)], images[::-1], reversed_frames, sample.id)
            items.append(
                _Item(task, sample.id, question, record["probe_answer"], processor.prompt_row(flipped), True)
            )
    return items, skipped


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
    """Per modality, then per task: accuracy beside chance; the probes (media reversed); what was skipped."""
    lines = [f"{'':18s} {'n':>4s} {'accuracy':>9s} {'chance':>7s} {'ratio':>6s}"]

    def line(name: str, s: dict) -> str:
        ratio = s["accuracy"] / s["chance"] if s["chance"] else 0.0
        return f"{name:18s} {s['n']:4d} {s['accuracy']:9.3f} {s['chance']:7.3f} {ratio:5.1f}x"

    lines += [line(name, s) for name, s in rep["modalities"].items()]
    lines += [line(f"  {name}", s) for name, s in rep["tasks"].items()]
    lines += [line(f"{name} reversed", s) for name, s in rep.get("probes", {}).items()]
    for name, s in rep.get("skipped", {}).items():
        lines.append(f"{name:18s} {s['n']:4d}   skipped: {s['reason']}")
    return "\n".join(lines)


def read_records(path_text: str) -> list[dict]:
    return [json.loads(line) for line in path_text.splitlines() if line.strip()]
