"""What a decode step makes of a sequence's logits: the next token (argmax, or a seeded sample), its text
(detokenized a short window at a time), where a stop ends it, and the events its caller gets (``emit``:
``{"delta": text}`` while it streams, then one ``{"done": result}``)."""

from __future__ import annotations

import torch

from components.structured import mask_logits


class Detokenizer:
    """A sequence's text, decoded as its tokens come, in time independent of the answer's length.

    Each step decodes only a short window: the tokens since the text last ended on a whole character, and
    the ones before them back to the previous such point, as a prefix (vLLM's and TGI's scheme). The
    prefix matters for tokenizers that space a word by its left neighbour (SentencePiece's "▁", stripped
    at the start of a decode): the new text is what the window adds beyond its prefix. A window that ends
    in an incomplete character (a U+FFFD) waits for the bytes still to come, 4 tokens at most. Decoding
    the whole answer at every step instead costs O(n) a token, O(n^2) an answer.

    For valid UTF-8 the text equals the tokenizer's decode of all the tokens. Not for an invalid byte run
    under a byte-fallback tokenizer (Llama's): its decoder turns the whole run into U+FFFD, valid
    characters in it included, where the window has already shown them. So an answer's final text is one
    decode of all its tokens, and this text only what streams before."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self.start = 0
        """The window's first token: prefix only, its text already in ``text``."""
        self.read = 0
        """Tokens before this one are in ``text``."""

    def add(self, tokens: list[int]) -> str:
        """The text of ``tokens`` (the sequence's tokens so far, the newest last) as far as it ends on a
        whole character."""
        window = self.tokenizer.decode(tokens[self.start :], skip_special_tokens=True)
        prefix = self.tokenizer.decode(tokens[self.start : self.read], skip_special_tokens=True)
        whole = len(window) > len(prefix) and not window.endswith("\ufffd")
        # a character is at most 4 bytes and a token at least one: past 4 tokens without a whole character,
        # what the window shows is final (invalid bytes, skipped specials); shown, so that a model stuck on
        # stray bytes neither stops streaming nor widens the window for ever
        if whole or len(tokens) - self.read > 4:
            self.text += window[len(prefix) :]
            self.start, self.read = self.read, len(tokens)
        return self.text


class Sequence:
    """An active request's output: its tokens so far, its text, its sampler, and what it has streamed."""

    def __init__(self, job, stops: list[str], eos: set[int], tokenizer, index: int = 0, matcher=None):
        self.job, self.index = job, index
        """``index``: which of the request's ``n`` choices this is."""
        self.matcher = matcher
        """An llguidance matcher (components/structured.py) when the request asked for a response_format."""
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = Detokenizer(tokenizer)
        self.stops = stops
        self.eos = eos
        self.sent = 0
        self.finish: str | None = None
        self.logprobs: list[float] = []
        self.cached_tokens = 0
        """Prompt tokens whose KV came from the prefix cache (OpenAI's ``cached_tokens``)."""
        self.generator = None
        if job.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(choice_seed(job.seed, index) if job.seed is not None else torch.seed())

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits (float32): argmax, or a sample after temperature and top-p
        (HF's order and rule: keep the smallest set whose probability reaches top_p, at least one)."""
        if self.matcher is not None:
            logits = mask_logits(self.matcher, logits)
        if self.generator is None:
            return int(torch.argmax(logits))
        scores = logits.float() / self.job.temperature
        if self.job.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - self.job.top_p
            drop[-1] = False
            scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        return int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))

    def advance(self, logits: torch.Tensor) -> int:
        """Pick the next token from ``logits``, detokenize, stop where due, emit; returns the token (the
        batch feeds it to the next step unless the sequence finished)."""
        token = self.pick(logits)
        if self.job.logprobs:
            self.logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        finish = None
        if token in self.eos:
            finish = "stop"
        else:
            self.tokens.append(token)
            if self.matcher is not None and not self.matcher.consume_token(token):  # its own failure only
                self.finish = "error"
                error = RuntimeError(
                    f"response_format: the grammar refused token {token}: {self.matcher.get_error()}"
                )
                self.job.emit({"error": error, "index": self.index})
                return token
        if finish is None and len(self.tokens) >= self.job.max_new_tokens:
            finish = "length"
        seen = len(self.text.text)
        text = self.text.add(self.tokens)
        if first_stop(text, self.stops, since=seen) is not None:
            finish = "stop"
        if finish:  # the whole answer decoded once, as generate()'s caller decodes it
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            cut = first_stop(text, self.stops)
            text = text if cut is None else text[:cut]
        if self.job.stream:
            ready = len(text) if finish else safe_prefix(text, self.stops)
            if ready > self.sent:
                self.job.emit({"delta": text[self.sent : ready], "index": self.index})
                self.sent = ready
        if finish:
            self.finish = finish
            self.job.emit({"done": self.result(text), "index": self.index})
        return token

    def result(self, text: str) -> dict:
        """The finished answer, as ``generate()`` gives it."""
        return {
            "text": text.strip(),
            "prompt_tokens": len(self.job.row["input_ids"]),
            "completion_tokens": len(self.tokens),
            "finish_reason": self.finish,
            "cached_tokens": self.cached_tokens,
            "index": self.index,
            "token_ids": list(self.tokens),
            **({"token_logprobs": self.logprobs} if self.job.logprobs else {}),
        }


def choice_seed(seed: int, index: int) -> int:
    """The generator seed of choice ``index`` of a seeded request: the seed itself for the first, so that
    n=1 samples what it always did; a seeded request gives the same n texts again."""
    return seed if index == 0 else (seed * 1_000_003 + index) % 2**63


def first_stop(text: str, stops: list[str], since: int = 0) -> int | None:
    """Where the first stop string in ``text`` begins (None: there is none), looking only at those that
    end past ``since`` (a stop string that ended earlier would have ended the sequence then)."""
    found = (text.find(stop, max(0, since - len(stop) + 1)) for stop in stops)
    return min((i for i in found if i >= 0), default=None)


def safe_prefix(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be streamed: all but a tail that could begin a stop string, and never a
    half-decoded character: a last U+FFFD may be the start of a character whose other bytes are still to
    come (an incomplete UTF-8 sequence decodes to one U+FFFD); any earlier one is final."""
    end = len(text) - 1 if text.endswith("\ufffd") else len(text)
    held = max(
        (
            k
            for stop in stops
            for k in range(1, min(len(stop) - 1, end) + 1)
            if text[end - k : end] == stop[:k]
        ),
        default=0,
    )
    return end - held
