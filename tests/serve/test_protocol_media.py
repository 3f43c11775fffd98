"""The ingress's checks without Ray: an image or video it has decoded and found valid is not decoded
again when it comes back (it travels to the replica as its bytes); a prompt is held to the model's
positions."""

import base64
import io
import pathlib

import numpy as np
import pytest
from PIL import Image

from components.processor import EncodedImage, EncodedVideo, VideoSampling
from serve import protocol
from serve.protocol import KnownMedia, Limits, parse_chat_request

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _body(parts):
    return {"model": "m", "messages": [{"role": "user", "content": parts}], "max_tokens": 4}


def _png(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_media_seen_valid_are_not_decoded_again(monkeypatch, h264):
    """First sight: decoded (which validates it) and sent decoded, with its SHA-256. Second sight: the
    same digest, sent as bytes with its size (video: its sampled frame count), and decoding made to raise
    is not called. Another image is still decoded; a corrupt one still gets its 400.
    Guards: KnownMedia; fails with KnownMedia.get always missing."""
    known = KnownMedia()
    sampling = VideoSampling(fps=2.0, max_frames=5)
    image = {"type": "image_url", "image_url": {"url": _png((200, 0, 0))}}
    video_url = "data:video/mp4;base64," + base64.b64encode(h264.read_bytes()).decode()
    video = {"type": "video_url", "video_url": {"url": video_url}}
    first = parse_chat_request(
        _body([image, {"type": "text", "text": "Q?"}]), ["m"], Limits(), sampling, known
    )
    clip = parse_chat_request(
        _body([video, {"type": "text", "text": "Q?"}]), ["m"], Limits(), sampling, known
    )
    assert isinstance(first.prompt.images[0], Image.Image) and isinstance(
        clip.prompt.video_frames, np.ndarray
    )
    with monkeypatch.context() as m:
        m.setattr(protocol, "_image", lambda *a: pytest.fail("decoded again"))
        m.setattr(protocol, "_video", lambda *a: pytest.fail("decoded again"))
        again = parse_chat_request(
            _body([image, {"type": "text", "text": "Q?"}]), ["m"], Limits(), sampling, known
        )
        clip_again = parse_chat_request(
            _body([video, {"type": "text", "text": "Q?"}]), ["m"], Limits(), sampling, known
        )
    assert again.media_digests == first.media_digests and clip_again.media_digests == clip.media_digests
    assert again.prompt.images[0] == EncodedImage(again.prompt.images[0].data, 40, 30)
    assert (
        isinstance(clip_again.prompt.video_frames, EncodedVideo) and len(clip_again.prompt.video_frames) == 5
    )
    decoded = again.prompt.decoded(sampling)
    assert np.array_equal(np.asarray(decoded.images[0]), np.asarray(first.prompt.images[0]))
    assert np.array_equal(clip_again.prompt.decoded(sampling).video_frames, clip.prompt.video_frames)
    other = {"type": "image_url", "image_url": {"url": _png((0, 0, 200))}}
    assert isinstance(
        parse_chat_request(_body([other]), ["m"], Limits(), sampling, known).prompt.images[0], Image.Image
    )
    corrupt = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"nope").decode()},
    }
    with pytest.raises(protocol.RequestError, match="expected an image"):
        parse_chat_request(_body([corrupt]), ["m"], Limits(), sampling, known)


def test_a_prompt_past_the_models_positions_is_refused_under_the_shipped_limits():
    """Guards: the prompt budget is the smaller of max_prompt_tokens and what the model's positions leave
    after max_tokens; fails if serve.yaml's max_prompt_tokens (8192) alone decides on a 4096-position
    model."""
    from serve.app import load_serve_config
    from serve.protocol import RequestError, check_prompt

    limits = load_serve_config(str(ROOT / "serve" / "serve.yaml"), "unused").limits
    assert limits.max_prompt_tokens == 8192
    request = parse_chat_request(_body([{"type": "text", "text": "Q?"}]), ["m"], limits)
    room = 4096 - request.max_new_tokens
    assert check_prompt(request, lambda prompt: room, 4096, limits) == room
    with pytest.raises(RequestError, match=f"at most {room} prompt tokens") as refused:
        check_prompt(request, lambda prompt: room + 1, 4096, limits)
    assert refused.value.status == 400 and refused.value.code == "context_length_exceeded"
