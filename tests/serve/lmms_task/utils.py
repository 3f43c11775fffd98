"""The demo's held-out split as an lmms-eval task (tests/serve/test_serve.py writes the YAML beside this
file with the split's path): each question sent as its text reads, text and media parts interleaved,
the video as a video_url the endpoint fetches from an allow-listed host."""

import re

from PIL import Image


def doc_to_messages(doc):
    content = []
    images = iter(doc["images"])
    for piece in re.split(r"(<image>|<video>)", doc["question"]):
        if piece == "<image>":
            content.append({"type": "image", "url": Image.open(next(images)).convert("RGB")})
        elif piece == "<video>":
            content.append({"type": "video", "url": doc["video_url"]})
        elif piece:
            content.append({"type": "text", "text": piece})
    return [{"role": "user", "content": content}]


def doc_to_visual(doc):
    return [Image.open(p).convert("RGB") for p in doc["images"]]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact": float(results[0].strip() == doc["answer"])}
