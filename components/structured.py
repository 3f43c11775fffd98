"""OpenAI's ``response_format`` (``json_object``, ``json_schema``) as a grammar that masks the tokens a
sequence may pick, through llguidance: a Rust matcher that builds its lexer from the tokenizer itself
(any fast HF tokenizer, byte-level or not) and computes each step's mask lazily on the CPU, with no
requirements of its own (xgrammar's wheel requires torch and triton; outlines-core builds an index over
the whole vocabulary for each schema before the first token); vLLM and SGLang offer it for the same
field.

The ingress compiles and validates the grammar (a bad schema is the request's 400); the replica keeps one
matcher per sequence and masks its logits at every step."""

from __future__ import annotations

import numpy as np
from llguidance import LLMatcher

JSON_OPTIONS = {"whitespace_flexible": False}
"""Compact JSON: a model can't spend its tokens on whitespace between values."""


class GrammarError(ValueError):
    pass


def grammar_for(response_format) -> str | None:
    """The llguidance grammar of a ``response_format`` (None: free text); raises GrammarError saying
    which part is wrong."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise GrammarError("an object with a type (text, json_object or json_schema)")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        schema = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError("json_schema: an object with a schema object")
        schema = spec.get("schema") or {"type": "object"}
    else:
        raise GrammarError("type text, json_object or json_schema")
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise GrammarError(f"a valid JSON schema ({e})") from e
    error = LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise GrammarError(f"a JSON schema llguidance supports ({error[:200]})")
    return grammar


class Grammars:
    """The replica's side: one llguidance tokenizer (built once, on first use) and a matcher per
    constrained sequence."""

    def __init__(self, tokenizer, stop_ids: list[int]):
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.lexer = None

    def matcher(self, grammar: str) -> LLMatcher:
        if self.lexer is None:
            import llguidance.hf

            self.lexer = llguidance.hf.from_tokenizer(self.tokenizer, eos_token=self.stop_ids)
        matcher = LLMatcher(self.lexer, grammar)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher


def mask_logits(matcher: LLMatcher, logits):
    """``logits`` (a torch tensor) with every token the grammar forbids next at -inf (ids past the
    tokenizer's, a padded LM head's, included)."""
    import torch  # the ingress compiles grammars without torch

    bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    allowed = np.unpackbits(bits, bitorder="little").astype(bool)
    size = logits.shape[-1]
    allowed = np.pad(allowed, (0, max(0, size - len(allowed))))[:size]
    return logits.masked_fill(torch.from_numpy(~allowed).to(logits.device), float("-inf"))
