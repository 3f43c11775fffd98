"""Generation on a real GPU: skipped where CUDA is absent (CI, this project's CPU machines); run where one
is lent (`python -m pytest -m gpu tests/pipelines`). The train loop's GPU path is the cuda case of
tests/pipelines/test_stage_worker.py: the real stage worker through its seams on one NCCL rank in bf16,
LoRA, an interruption and a resume, and the export."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_greedy_generation_on_gpu():
    """Serving's and evaluation's generate on a GPU: the batch follows the model to its device (and bf16
    pixels for a bf16 replica); greedy output on the GPU in fp32 equals the CPU's."""
    from PIL import Image, ImageDraw

    from components.conversation import Turn
    from components.generation import generate
    from components.model import build_model
    from components.processor import Prompt
    from pipelines.recipes import load_recipe

    recipe = load_recipe("llava_onevision", "tiny", demo_dir="unused")
    spec = recipe.model
    torch.manual_seed(0)
    model, processor = build_model(spec)
    model.eval()
    image = Image.new("RGB", (120, 90), (240, 240, 240))
    ImageDraw.Draw(image).rectangle((20, 20, 80, 70), fill=(30, 30, 200))
    rows = [
        processor.prompt_row(Prompt([Turn("user", "<image>\nWhat shape is it?")], [image])),
        processor.prompt_row(Prompt([Turn("user", "Name a color.")])),
    ]
    cpu = generate(model, processor, rows, max_new_tokens=8)
    gpu = generate(model.to("cuda"), processor, rows, max_new_tokens=8)
    assert [r["text"] for r in gpu] == [r["text"] for r in cpu]
    half = generate(model.to(torch.bfloat16), processor, rows, max_new_tokens=8)
    assert [r["prompt_tokens"] for r in half] == [r["prompt_tokens"] for r in cpu]
    assert all(r["completion_tokens"] <= 8 and r["finish_reason"] in ("stop", "length") for r in half)
