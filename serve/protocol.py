"""The OpenAI chat-completions request, parsed and checked: every problem is a 4xx with a clear message.

No Ray and no FastAPI here: the ingress calls ``parse_chat_request`` and turns ``RequestError`` into
an OpenAI-style error body. Media comes as data: URLs; http(s) and s3:// only when allow-listed.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.request
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from components import storage
from components.conversation import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Turn
from components.processor import Prompt, VideoSampling
from components.video import VideoDecodeError, read_frames


class RequestError(ValueError):
    """A bad request: HTTP status, the parameter at fault, and a message saying expected against found."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str = "invalid_request"
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param,
                          "code": self.code}}  # fmt: skip


@dataclass
class Limits:
    """What one request may carry."""

    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 12
    max_video_bytes: int = 64 * 1024 * 1024
    max_prompt_tokens: int = 8192
    max_tokens: int = 512
    max_stop: int = 4
    allowed_media_prefixes: list[str] = field(default_factory=list)
    """URL prefixes (https://host/..., s3://bucket/...) the server may fetch; data: URLs are always allowed."""
    fetch_timeout_s: float = 10.0


@dataclass
class ChatRequest:
    model: str
    prompt: Prompt
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    num_media: int = 0


def _number(body: dict, name: str, default, lo: float, hi: float, kind=float):
    value = body.get(name, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not isinstance(value, int))
    ):
        raise RequestError(f"{name}: expected a {kind.__name__}, found {value!r}", name)
    if not lo <= value <= hi:
        raise RequestError(f"{name}: expected a value in [{lo}, {hi}], found {value}", name)
    return kind(value)


def _fetch(url: str, limits: Limits, limit_bytes: int, param: str) -> bytes:
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise RequestError(
                f"{param}: expected a base64 data URL (data:<mime>;base64,...), found {url[:40]!r}", param
            )
        if len(payload) * 3 // 4 > limit_bytes:
            raise RequestError(f"{param}: expected at most {limit_bytes} bytes, found about {len(payload) * 3 // 4}",
                               param, status=413, code="too_large")  # fmt: skip
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(
                f"{param}: expected valid base64 data, found undecodable text ({e})", param
            ) from e
    if not any(url.startswith(prefix) for prefix in limits.allowed_media_prefixes):
        scheme = url.split(":", 1)[0] if ":" in url else url[:20]
        raise RequestError(
            f"{param}: expected a data: URL or an allow-listed prefix {limits.allowed_media_prefixes}, found {scheme!r} URL",
            param, status=400, code="url_not_allowed",
        )  # fmt: skip
    if storage.is_s3(url):
        data = storage.read_bytes(url)
    elif url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=limits.fetch_timeout_s) as r:  # noqa: S310 (allow-listed)
            data = r.read(limit_bytes + 1)
    else:
        raise RequestError(f"{param}: expected an http(s), s3 or data URL, found {url[:30]!r}", param)
    if len(data) > limit_bytes:
        raise RequestError(
            f"{param}: expected at most {limit_bytes} bytes, found more", param, 413, "too_large"
        )
    return data


def _image(data: bytes, limits: Limits, param: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        pixels = image.width * image.height
        if pixels > limits.max_image_pixels:
            raise RequestError(
                f"{param}: expected at most {limits.max_image_pixels} pixels, found {image.width}x{image.height}",
                param, 413, "too_large",
            )  # fmt: skip
        image.load()
        return image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, RequestError):
            raise
        raise RequestError(
            f"{param}: expected an image (PNG, JPEG, ...), found {len(data)} bytes that are not one", param
        ) from e


def _url_of(part: dict, key: str, param: str) -> str:
    value = part.get(key)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise RequestError(f"{param}.{key}.url: expected a URL string, found {url!r}", f"{param}.{key}")
    return url


def parse_chat_request(
    body, served_models: list[str], limits: Limits, video: VideoSampling | None = None
) -> ChatRequest:
    """Validate an OpenAI chat-completions body and load its media; raises RequestError. Video frames are
    sampled as the checkpoint was trained (``video``: its processor's VideoSampling)."""
    video_sampling = video or VideoSampling()
    if not isinstance(body, dict):
        raise RequestError(f"body: expected a JSON object, found {type(body).__name__}")
    model = body.get("model")
    if model not in served_models:
        raise RequestError(
            f"model: expected one of {served_models}, found {model!r}", "model", 404, "model_not_found"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(
            f"messages: expected a non-empty list, found {type(messages).__name__}", "messages"
        )
    if body.get("n", 1) != 1:
        raise RequestError(f"n: expected 1, found {body.get('n')!r}", "n")
    turns, images, video = [], [], None
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{param}: expected an object with role and content", param)
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise RequestError(
                f"{param}.role: expected system, user or assistant, found {role!r}", f"{param}.role"
            )
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list) and content:
            parts = content
        else:
            raise RequestError(
                f"{param}.content: expected a string or a list of parts, found {content!r:.60}",
                f"{param}.content",
            )
        text = []
        for k, part in enumerate(parts):
            pparam = f"{param}.content[{k}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(f"{pparam}.text: expected a string", pparam)
                if IMAGE_PLACEHOLDER in part["text"] or VIDEO_PLACEHOLDER in part["text"]:
                    raise RequestError(
                        f"{pparam}.text: expected no <image>/<video> markers (send image_url parts)", pparam
                    )
                text.append(part["text"])
            elif kind in ("image_url", "video_url") and role != "user":
                raise RequestError(
                    f"{pparam}: expected media only in user messages, found it in a {role} message", pparam
                )
            elif kind == "image_url":
                if len(images) >= limits.max_images:
                    raise RequestError(f"{pparam}: expected at most {limits.max_images} images, found more",
                                       pparam, 413, "too_many_images")  # fmt: skip
                data = _fetch(_url_of(part, "image_url", pparam), limits, limits.max_image_bytes, pparam)
                images.append(_image(data, limits, pparam))
                text.append(IMAGE_PLACEHOLDER)
            elif kind == "video_url":
                if video is not None:
                    raise RequestError(f"{pparam}: expected at most one video, found a second", pparam)
                data = _fetch(_url_of(part, "video_url", pparam), limits, limits.max_video_bytes, pparam)
                try:
                    video = read_frames(data, fps=video_sampling.fps, max_frames=video_sampling.max_frames,
                                        force_uniform=video_sampling.uniform).frames  # fmt: skip
                except VideoDecodeError as e:
                    raise RequestError(
                        f"{pparam}: expected a decodable video, found {e.reason}", pparam
                    ) from e
                text.append(VIDEO_PLACEHOLDER)
            else:
                raise RequestError(
                    f"{pparam}.type: expected text, image_url or video_url, found {kind!r}", pparam
                )
        joined = (
            "\n".join(t for t in text)
            if any(t in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER) for t in text)
            else "".join(text)
        )
        if not joined.strip():
            raise RequestError(f"{param}.content: expected non-empty content", f"{param}.content")
        turns.append(Turn(role, joined))
    if video is not None and images:
        raise RequestError("messages: expected images or one video, found both", "messages")
    roles = [t.role for t in turns if t.role != "system"]
    if not roles or roles[-1] != "user":
        raise RequestError("messages: expected the last message from the user", "messages")
    for a, b in zip(roles, roles[1:], strict=False):
        if a == b:
            raise RequestError(
                f"messages: expected user and assistant turns to alternate, found two {a} turns", "messages"
            )
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stop, list)
        or len(stop) > limits.max_stop
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise RequestError(
            f"stop: expected a string or up to {limits.max_stop} strings, found {body.get('stop')!r}", "stop"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream: expected true or false, found {stream!r}", "stream")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"seed: expected an integer, found {seed!r}", "seed")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 64))
    request = ChatRequest(
        model=model,
        prompt=Prompt(turns=turns, images=images, video_frames=video),
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", 64, 1, limits.max_tokens, int),
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
        stop=stop,
        seed=seed,
        stream=stream,
        num_media=len(images) + (video is not None),
    )
    return request
