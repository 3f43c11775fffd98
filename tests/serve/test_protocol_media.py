"""The ingress's side of "media encoded once", without Ray: an image or video it has decoded and found
valid is not decoded again when it comes back; it travels to the replica as its bytes."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from components.processor import EncodedImage, EncodedVideo, VideoSampling
from serve import protocol
from serve.protocol import KnownMedia, Limits, parse_chat_request


def _body(parts):
    return {"model": "m", "messages": [{"role": "user", "content": parts}], "max_tokens": 4}


def _png(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_media_seen_valid_are_not_decoded_again(monkeypatch, h264):
    """First sight: decoded (which validates it) and sent decoded, with its SHA-256. Second sight: the
    same digest, sent as bytes with its size (video: its sampled frame count), and decoding made to raise
    is not called. Another image is still decoded; a corrupt one still gets its 400. Fails with KnownMedia.get
    always missing."""
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
