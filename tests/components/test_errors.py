"""Every error a user sees reads one way, made once from its fields (components/errors.py): the whole text
of one example per error type outside the rejects table (whose kinds are checked word for word in
tests/pipelines/test_preprocess.py). Seen failing with serve/protocol.py's video errors built from the
video error's own text, as before (a request's part prefixed to "video <bytes>: expected ...")."""

import base64
import json

import pytest

from components.errors import Mismatch
from components.instruct import ImageAnnotations, ParseError, parse_response
from components.manifest import ManifestError, read_records
from components.media import DeadlineExceeded
from components.video import VideoDecodeError, read_frames
from serve.protocol import Limits, RequestError, parse_body, parse_chat_request


def _chat(content) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


def _request_error(body) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_chat_request(body, ["m"], Limits())
    return caught.value


def test_video_errors_are_said_of_their_own_subject():
    with pytest.raises(VideoDecodeError) as caught:
        read_frames(b"\x00" * 64)
    e = caught.value
    assert str(e) == (
        "video <bytes>: expected a video container (mp4, mkv/webm, avi, mpeg), found bytes "
        "b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00'"
    )
    video = "data:video/mp4;base64," + base64.b64encode(b"\x00" * 64).decode()
    error = _request_error(_chat([{"type": "video_url", "video_url": {"url": video}}]))
    assert error.body()["error"] == {
        "message": "messages[0].content[0]: expected a video container (mp4, mkv/webm, avi, mpeg), found "
        "bytes b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00'",
        "type": "invalid_request_error",
        "param": "messages[0].content[0]",
        "code": "invalid_request",
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "x", "messages": []}, "model: expected one of ['m'], found 'x'"),
        (_chat("hi") | {"seed": 2**70}, "seed: expected a 64-bit integer, found 1180591620717411303424"),
        (
            {"model": "m", "messages": [{"role": "assistant", "content": "hi"}]},
            "messages: expected the last message from the user, found the last from the assistant",
        ),
        (
            _chat([{"type": "audio", "audio": "x"}]),
            "messages[0].content[0].type: expected text, image_url or video_url, found 'audio'",
        ),
    ],
    ids=["model", "seed", "last-turn", "part-type"],
)
def test_request_errors_read_whole(body, message):
    assert str(_request_error(body)) == message


def test_bad_json_names_the_place_not_the_decoder():
    with pytest.raises(RequestError) as caught:
        parse_body(b'{"model": "m", ', Limits())
    assert str(caught.value) == "body: expected JSON, found unparsable text (at character 15)"


def test_manifest_teacher_and_deadline_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1},')
    with pytest.raises(ManifestError) as caught:
        read_records(str(bad), "bad")
    assert str(caught.value) == f"{bad}: expected a JSON list of records, found unreadable JSON at line 1"
    with pytest.raises(ParseError) as parsed:
        parse_response("detail", "Too short.", ImageAnnotations("img1", "a.png", ["A cat."]))
    assert str(parsed.value) == (
        "sample 'img1-detail', response 'detail': expected a descriptive paragraph of 5 words or more, "
        "found 'Too short.'"
    )
    assert str(DeadlineExceeded(2.0, "s1")) == (
        "sample 's1', field 'media': expected decoding within 2.0s, found it slower"
    )
    for e in (caught.value, parsed.value):
        assert isinstance(e, Mismatch) and "expected expected" not in str(e)
        assert json.dumps(str(e))  # plain text
