from __future__ import annotations

import logging

import pytest

from gateway.__main__ import listen_host


def test_without_keys_only_loopback_is_served_and_it_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="gateway"):
        assert listen_host("0.0.0.0", keys_enabled=False) == "127.0.0.1"
        assert listen_host("127.0.0.1", keys_enabled=False) == "127.0.0.1"
    assert "no API keys configured: listening on 127.0.0.1 only, not 0.0.0.0" in caplog.text
    assert "serving local clients on 127.0.0.1 only" in caplog.text


def test_with_keys_the_configured_host_is_used() -> None:
    assert listen_host("0.0.0.0", keys_enabled=True) == "0.0.0.0"
