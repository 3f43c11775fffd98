"""Which fields of a chat-completions request the endpoint acts on, accepts without effect, or refuses."""

from __future__ import annotations

import json

HANDLED_FIELDS = (
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "n",
    "response_format",
    "return_token_ids",
)
"""The request fields this endpoint acts on."""
NO_EFFECT_FIELDS = ("user", "metadata", "store", "service_tier", "media_io_kwargs")
"""Accepted and without effect on the answer: a client's own bookkeeping, and vLLM's media_io_kwargs
(frames are sampled as the checkpoint was trained, whatever a client asks)."""
DEFAULT_VALUES = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logprobs": (False,),
    "tool_choice": ("none",),
    "tools": ([],),
}
"""Fields this endpoint does not act on, accepted only at values that ask for nothing (OpenAI's defaults)."""


def unsupported(body: dict) -> list[str]:
    """The fields a request asks for that the endpoint would otherwise ignore (tools, response_format,
    logit_bias, ...): the caller answers 400 naming them, so a client never believes they were honoured."""
    known = set(HANDLED_FIELDS) | set(NO_EFFECT_FIELDS)
    return sorted(
        k
        for k, v in body.items()
        if k not in known and (v is not None) and not any(v == d for d in DEFAULT_VALUES.get(k, ()))
    )


def short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def refusal(body: dict) -> tuple[str, str, str] | None:
    """(subject, expected, found) of the 400 for a request's unsupported fields; None when it has none."""
    asked = unsupported(body)
    if not asked:
        return None
    return (
        ", ".join(asked),
        f"only the fields this endpoint supports ({', '.join(HANDLED_FIELDS)})",
        "unsupported " + ", ".join(f"{k}={short(body[k])}" for k in asked),
    )
