"""The OpenAI chat-completions request, parsed and checked: every problem is a 4xx with a clear message.

No Ray and no FastAPI here: the ingress calls ``parse_body`` and ``parse_chat_request`` and turns
``RequestError`` into an OpenAI-style error body. Everything is checked before a request reaches the
model: the body's size, nesting and numbers, every field's range and encoding, media budgets (bytes,
pixels from the header, frames x pixels from the container), and (``check_prompt``) the prompt's tokens
against the model's positions. Media comes as data: URLs; http(s) and s3:// only when allow-listed, with one
deadline for the whole fetch and no redirect off the allow-list.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import hashlib
import io
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from components import storage
from components.conversation import MEDIA_PLACEHOLDERS, Turn, content_text
from components.errors import Mismatch
from components.media import MediaBudget
from components.processor import EncodedImage, EncodedVideo, Prompt, VideoSampling
from components.structured import GrammarError, grammar_for
from components.video import VideoDecodeError, VideoTooLargeError
from serve.fields import refusal, short


class RequestError(Mismatch):
    """A bad request: what was expected of ``subject`` (a parameter, or a part of one) against what was
    found, the parameter at fault (``param``; the subject unless said), the HTTP status and OpenAI's code."""

    def __init__(
        self,
        subject: str,
        expected: str,
        found: str,
        *,
        param: str | None = None,
        status: int = 400,
        code: str = "invalid_request",
    ):
        super().__init__(subject, expected, found)
        self.param = subject if param is None else param
        self.status = status
        self.code = code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": "invalid_request_error",
                "param": self.param,
                "code": self.code,
            }
        }


def internal_error(where: str, exc: BaseException) -> dict:
    """An OpenAI-style body for our own failure: what failed, never a traceback or a host path."""
    return {
        "error": {
            "message": f"{where}: expected an answer, found an internal error ({type(exc).__name__})",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }


SERVING_MEDIA = MediaBudget(
    max_image_bytes=8 * 1024 * 1024, max_image_pixels=4096 * 4096, max_video_bytes=64 * 1024 * 1024
)
"""A request's media budget by default; ``limits: {media: {...}}`` in serve.yaml changes what it names."""


@dataclass
class Limits:
    """What one request may carry."""

    max_body_bytes: int = 96 * 1024 * 1024
    """The whole request body (413 beyond): room for 12 images of max_image_bytes as base64."""
    max_json_depth: int = 32
    media: MediaBudget = SERVING_MEDIA
    """What a request's media may cost (images and their pixels, read from headers before decoding; the
    video's bytes, and its sampled frames x pixels per frame, read from the container)."""
    max_prompt_tokens: int | None = None
    """At most this many prompt tokens, and never more than the model's positions (max_position_embeddings)
    leave after the request's max_tokens; None: what they leave."""
    max_new_tokens: int = 512
    """The most a request's max_tokens may ask for."""
    max_stop: int = 4
    max_n: int = 8
    """The most choices (``n``) one request may ask for."""
    allowed_media_prefixes: list[str] = field(default_factory=list)
    """URL prefixes (https://host/..., s3://bucket/...) the server may fetch; data: URLs are always
    allowed."""
    fetch_timeout_s: float = 10.0
    """One deadline for a whole fetch (connect, redirects, every read)."""
    fetch_concurrency: int = 4
    """Fetches and decodes in flight at once (their own threads: a slow upstream delays only its request)."""

    def __post_init__(self) -> None:
        if isinstance(self.media, dict):
            self.media = dataclasses.replace(SERVING_MEDIA, **self.media)


@dataclass
class ChatRequest:
    model: str
    prompt: Prompt
    max_new_tokens: int
    """The request's max_tokens (or max_completion_tokens)."""
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    num_media: int = 0
    include_usage: bool = False
    """stream_options.include_usage: the stream ends with a chunk that carries the usage."""
    media_digests: tuple[str, ...] = ()
    """SHA-256 of each medium's bytes, in the prompt's order."""
    n: int = 1
    """Choices, forked from one prefill."""
    grammar: str | None = None
    """response_format as an llguidance grammar (components/structured.py); None: free text."""
    return_token_ids: bool = False
    """vLLM's extension: the answer carries the prompt's token ids and each choice's."""
    conversation: str = ""
    """The routing key of the conversation this request continues (serve/routing.py)."""


def _number(body: dict, name: str, default, lo: float, hi: float, kind=float):
    value = body.get(name, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not isinstance(value, int))
    ):
        raise RequestError(name, f"a {kind.__name__}", repr(value))
    if not lo <= value <= hi:
        raise RequestError(name, f"a value in [{lo}, {hi}]", str(value))
    return kind(value)


def parse_body(raw: bytes, limits: Limits):
    """The JSON body, bounded: 413 past max_body_bytes; 400 for bad JSON, deep nesting or huge numbers."""
    if len(raw) > limits.max_body_bytes:
        raise RequestError(
            "body",
            f"at most {limits.max_body_bytes} bytes",
            str(len(raw)),
            status=413,
            code="too_large",
        )
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(
            "body", "JSON", f"unparsable text (at character {getattr(e, 'pos', getattr(e, 'start', '?'))})"
        ) from e
    except RecursionError as e:
        raise RequestError("body", f"JSON nested at most {limits.max_json_depth} deep", "deeper") from e
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise RequestError("body", "JSON numbers of ordinary size", "a number too long to convert") from e
    depth, stack = 0, [(body, 1)]
    while stack:
        value, level = stack.pop()
        depth = max(depth, level)
        if depth > limits.max_json_depth:
            raise RequestError("body", f"JSON nested at most {limits.max_json_depth} deep", "deeper")
        if isinstance(value, dict):
            stack.extend((v, level + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, level + 1) for v in value)
    return body


def has_media(body) -> bool:
    """Whether any message of a (parsed) body carries media parts: only those go to the media threads."""
    messages = body.get("messages") if isinstance(body, dict) else None
    return isinstance(messages, list) and any(
        isinstance(m, dict)
        and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") in ("image_url", "video_url") for p in m["content"])
        for m in messages
    )


class _AllowListedRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are followed only to allow-listed prefixes."""

    def __init__(self, prefixes: list[str], param: str):
        self.prefixes, self.param = prefixes, param

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not any(newurl.startswith(p) for p in self.prefixes):
            host = urllib.parse.urlparse(newurl).hostname
            raise RequestError(
                self.param,
                "redirects within the allow-list",
                f"one to host {host!r}",
                code="url_not_allowed",
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _http_get(url: str, limits: Limits, limit_bytes: int, param: str) -> bytes:
    """GET with one deadline for everything: connect, redirects and every read. Each read takes what has
    arrived (``read1``: one receive, not "until the buffer fills") and waits at most the time left, so an
    upstream that trickles a byte every few seconds is cut at the deadline too. Redirects only within the
    allow-list; an upstream failure is a 4xx naming the host, never our 500."""
    host = urllib.parse.urlparse(url).hostname
    deadline = time.monotonic() + limits.fetch_timeout_s
    opener = urllib.request.build_opener(_AllowListedRedirects(limits.allowed_media_prefixes, param))
    chunks, size = [], 0
    try:
        with opener.open(url, timeout=limits.fetch_timeout_s) as response:  # noqa: S310 (allow-listed)
            sock = getattr(getattr(response.fp, "raw", None), "_sock", None)  # http.client's socket
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                if sock is not None:
                    sock.settimeout(left)
                chunk = response.read1(min(1 << 16, limit_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > limit_bytes:
                    raise RequestError(
                        param,
                        f"at most {limit_bytes} bytes",
                        "more",
                        status=413,
                        code="too_large",
                    )
    except urllib.error.HTTPError as e:
        raise RequestError(
            param,
            f"the media from host {host!r}",
            f"HTTP {e.code}",
            code="media_fetch_failed",
        ) from e
    except (TimeoutError, OSError) as e:
        if isinstance(e, RequestError):
            raise
        raise RequestError(
            param,
            f"the media from host {host!r} within {limits.fetch_timeout_s}s",
            f"{'a timeout' if isinstance(e, TimeoutError) else type(e).__name__}",
            code="media_fetch_failed",
        ) from e
    return b"".join(chunks)


def _fetch(url: str, limits: Limits, limit_bytes: int, param: str) -> bytes:
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise RequestError(param, "a base64 data URL (data:<mime>;base64,...)", f"{url[:40]!r}")
        if len(payload) * 3 // 4 > limit_bytes:
            raise RequestError(
                param,
                f"at most {limit_bytes} bytes",
                f"about {len(payload) * 3 // 4}",
                status=413,
                code="too_large",
            )
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(param, "valid base64 data", f"undecodable text ({e})") from e
    if not any(url.startswith(prefix) for prefix in limits.allowed_media_prefixes):
        scheme = url.split(":", 1)[0] if ":" in url else url[:20]
        raise RequestError(
            param,
            f"a data: URL or an allow-listed prefix {limits.allowed_media_prefixes}",
            f"{scheme!r} URL",
            code="url_not_allowed",
        )
    if storage.is_s3(url):
        try:
            data = storage.read_bytes(url)
        except storage.StorageError as e:
            bucket = url[len("s3://") :].split("/", 1)[0]
            raise RequestError(
                param,
                f"the media in bucket {bucket!r}",
                "none readable",
                code="media_fetch_failed",
            ) from e
    elif url.startswith(("http://", "https://")):
        data = _http_get(url, limits, limit_bytes, param)
    else:
        raise RequestError(param, "an http(s), s3 or data URL", f"{url[:30]!r}")
    if len(data) > limit_bytes:
        raise RequestError(param, f"at most {limit_bytes} bytes", "more", status=413, code="too_large")
    return data


def _image(data: bytes, limits: Limits, param: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        pixels = image.width * image.height
        if pixels > limits.media.max_image_pixels:
            raise RequestError(
                param,
                f"at most {limits.media.max_image_pixels} pixels",
                f"{image.width}x{image.height}",
                status=413,
                code="too_large",
            )
        image.load()
        return image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, RequestError):
            raise
        raise RequestError(param, "an image (PNG, JPEG, ...)", f"{len(data)} bytes that are not one") from e


def _valid_text(text: str, param: str) -> None:
    """Text the tokenizer can take: valid Unicode (a lone surrogate from a JSON escape is not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(param, "valid Unicode text", f"a lone surrogate at {e.start}") from e


def check_prompt(request: ChatRequest, count_tokens, positions: int, limits: Limits) -> int:
    """The prompt's tokens (text and media, as the model will see them) against the model's positions:
    400 with OpenAI's code context_length_exceeded when the prompt and max_tokens do not fit. Returns the
    count."""
    room = positions - request.max_new_tokens  # what the model's positions leave the prompt
    budget = min(limits.max_prompt_tokens, room) if limits.max_prompt_tokens else room
    chars = sum(len(t.text) for t in request.prompt.turns)
    if chars > 8 * budget:  # no tokenizer yields fewer than one token per 8 characters of this much text
        raise RequestError(
            "messages",
            f"at most {budget} prompt tokens",
            f"{chars} characters",
            code="context_length_exceeded",
        )
    count = count_tokens(request.prompt)
    if count > budget:
        raise RequestError(
            "messages",
            f"at most {budget} prompt tokens (the smaller of max_prompt_tokens {limits.max_prompt_tokens} "
            f"and {positions} positions less max_tokens {request.max_new_tokens})",
            str(count),
            code="context_length_exceeded",
        )
    return count


def _has_placeholder(text: str) -> bool:
    return any(marker in text for marker in MEDIA_PLACEHOLDERS.values())


def _url_of(part: dict, key: str, param: str) -> str:
    value = part.get(key)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise RequestError(f"{param}.{key}.url", "a URL string", repr(url), param=f"{param}.{key}")
    return url


class KnownMedia:
    """Media this ingress has decoded and found valid, by content: an image's size or a video's sampled
    frame count, for the most recent ``capacity`` of them. Seen again, a medium is not decoded here: it
    goes to the replica as its bytes, and a replica that has its features cached never decodes it."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
            return self.entries.get(key)

    def put(self, key, value) -> None:
        with self.lock:
            self.entries[key] = value
            self.entries.move_to_end(key)
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)


@dataclass
class _Media:
    """What a request's parts have loaded so far: its images, its one video's frames, and the SHA-256 of
    each medium's bytes in order (the replica's feature cache keys on them)."""

    known: KnownMedia | None = None
    images: list = field(default_factory=list)
    video: object = None
    digests: list[str] = field(default_factory=list)


def _parse_part(part, pparam: str, role: str, limits: Limits, sampling: VideoSampling, media: _Media):
    """One content part as ``(kind, text)`` for ``content_text``; its medium fetched and decoded."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{pparam}.text", "a string", f"{part.get('text')!r:.40}", param=pparam)
        _valid_text(part["text"], f"{pparam}.text")
        if role != "user" and _has_placeholder(part["text"]):
            raise RequestError(
                f"{pparam}.text",
                "<image>/<video> markers only in user messages",
                f"one in a {role} message",
                param=pparam,
            )
        return "text", part["text"]
    if kind not in ("image_url", "video_url"):
        raise RequestError(f"{pparam}.type", "text, image_url or video_url", repr(kind), param=pparam)
    if role != "user":
        raise RequestError(pparam, "media only in user messages", f"it in a {role} message")
    if kind == "image_url":
        if len(media.images) >= limits.media.max_images:
            raise RequestError(
                pparam,
                f"at most {limits.media.max_images} images",
                "more",
                status=413,
                code="too_many_images",
            )
        data = _fetch(_url_of(part, "image_url", pparam), limits, limits.media.max_image_bytes, pparam)
        digest = hashlib.sha256(data).hexdigest()
        size = media.known.get(("image", digest)) if media.known is not None else None
        if size is None:  # first sight: decoded (that validates it), and sent decoded
            image = _image(data, limits, pparam)
            if media.known is not None:
                media.known.put(("image", digest), image.size)
        else:  # valid before: sent as its bytes, decoded by the replica only if its features are not cached
            image = EncodedImage(data, *size)
        media.images.append(image)
    else:
        if media.video is not None:
            raise RequestError(pparam, "at most one video", "a second")
        data = _fetch(_url_of(part, "video_url", pparam), limits, limits.media.max_video_bytes, pparam)
        digest = hashlib.sha256(data).hexdigest()
        key = ("video", digest, sampling)
        frames = media.known.get(key) if media.known is not None else None
        if frames is None:
            media.video = _video(data, limits, sampling, pparam)
            if media.known is not None:
                media.known.put(key, len(media.video))
        else:
            media.video = EncodedVideo(data, frames)
    media.digests.append(digest)
    return ("image" if kind == "image_url" else "video"), ""


def _parse_message(message, param: str, limits: Limits, sampling: VideoSampling, media: _Media) -> Turn:
    """One message as a turn: its role, and its content parts made text by the training layout's rule."""
    if not isinstance(message, dict):
        raise RequestError(param, "an object with role and content", f"{message!r:.40}")
    role = message.get("role")
    if role not in ("system", "user", "assistant"):
        raise RequestError(f"{param}.role", "system, user or assistant", repr(role))
    content = message.get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    elif not isinstance(content, list) or not content:
        raise RequestError(f"{param}.content", "a string or a list of parts", f"{content!r:.60}")
    parts = [
        _parse_part(part, f"{param}.content[{k}]", role, limits, sampling, media)
        for k, part in enumerate(content)
    ]
    for kind, marker in MEDIA_PLACEHOLDERS.items():
        markers = sum(text.count(marker) for k, text in parts if k == "text")
        given = sum(1 for k, _ in parts if k == kind)
        if markers and markers != given:
            raise RequestError(
                f"{param}.content",
                f"one {kind}_url part for each {marker} marker ({markers})",
                str(given),
            )
    text = content_text(parts)
    if not text.strip():
        raise RequestError(f"{param}.content", "non-empty content", "none")
    return Turn(role, text)


def _video(data: bytes, limits: Limits, sampling: VideoSampling, param: str):
    """The video's frames as the checkpoint was trained (its sampling); 413 past the frame budget."""
    try:
        return sampling.read(data, max_pixels=limits.media.max_video_pixels).frames
    except VideoTooLargeError as e:
        raise RequestError(*e.about(param), status=413, code="too_large") from e
    except VideoDecodeError as e:
        raise RequestError(*e.about(param)) from e


def parse_chat_request(
    body,
    served_models: list[str],
    limits: Limits,
    video: VideoSampling | None = None,
    known: KnownMedia | None = None,
) -> ChatRequest:
    """Validate an OpenAI chat-completions body and load its media; raises RequestError. Video frames are
    sampled as the checkpoint was trained (``video``: its processor's VideoSampling); media in ``known``
    are not decoded again."""
    if not isinstance(body, dict):
        raise RequestError("body", "a JSON object", type(body).__name__)
    model = body.get("model")
    if model not in served_models:
        raise RequestError(
            "model",
            f"one of {served_models}",
            f"{model!r}",
            status=404,
            code="model_not_found",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "a non-empty list", type(messages).__name__)
    if (refused := refusal(body)) is not None:
        raise RequestError(*refused, code="unsupported_field")
    media = _Media(known)
    turns = [
        _parse_message(m, f"messages[{i}]", limits, video or VideoSampling(), media)
        for i, m in enumerate(messages)
    ]
    images, video = media.images, media.video
    if video is not None and images:
        raise RequestError("messages", "images or one video", "both")
    roles = [t.role for t in turns if t.role != "system"]
    if not roles or roles[-1] != "user":
        raise RequestError(
            "messages",
            "the last message from the user",
            f"the last from the {roles[-1] if roles else 'system'}",
        )
    for a, b in zip(roles, roles[1:], strict=False):
        if a == b:
            raise RequestError("messages", "user and assistant turns to alternate", f"two {a} turns")
    return ChatRequest(
        model=model,
        prompt=Prompt(turns=turns, images=images, video_frames=video),
        media_digests=tuple(media.digests),
        num_media=len(images) + (video is not None),
        **_generation_fields(body, limits),
    )


def _generation_fields(body: dict, limits: Limits) -> dict:
    """max_tokens, temperature, top_p, stop, seed, stream, n and response_format, each checked."""
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stop, list)
        or len(stop) > limits.max_stop
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise RequestError("stop", f"a string or up to {limits.max_stop} strings", f"{body.get('stop')!r}")
    for k, s in enumerate(stop):
        _valid_text(s, f"stop[{k}]")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream", "true or false", repr(stream))
    seed = body.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63
    ):
        raise RequestError("seed", "a 64-bit integer", str(seed)[:40])
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise RequestError("stream_options", "an object with include_usage", short(options))
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise RequestError("stream_options.include_usage", "true or false", short(include_usage))
    if options is not None and not stream:
        raise RequestError("stream_options", "only with stream: true", "stream false")
    return_token_ids = body.get("return_token_ids", False)
    if not isinstance(return_token_ids, bool) or (return_token_ids and stream):
        raise RequestError(
            "return_token_ids", "true or false, and only without stream", short(return_token_ids)
        )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 64))
    try:
        grammar = grammar_for(body.get("response_format"))
    except GrammarError as e:
        raise RequestError("response_format", str(e), short(body.get("response_format"))) from e
    return {
        "n": _number(body, "n", 1, 1, limits.max_n, int),
        "return_token_ids": return_token_ids,
        "grammar": grammar,
        "include_usage": include_usage,
        "max_new_tokens": _number(
            {"max_tokens": max_tokens}, "max_tokens", 64, 1, limits.max_new_tokens, int
        ),
        "temperature": _number(body, "temperature", 0.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 1e-6, 1.0),
        "stop": stop,
        "seed": seed,
        "stream": stream,
    }
