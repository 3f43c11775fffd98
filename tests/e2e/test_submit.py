"""The job client's auth token: named when missing. A pipeline submitted as a job to a token-auth cluster
runs in the cluster tier (tests/cluster/test_cluster.py), on two nodes."""

import pytest

from pipelines.submit import AuthTokenMissing, auth_token_source


def test_missing_token_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "nope"))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    with pytest.raises(AuthTokenMissing, match="RAY_AUTH_TOKEN_PATH"):
        auth_token_source()
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(AuthTokenMissing, match="RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"):
        auth_token_source()
