"""Process settings: the upstreams file and the static list are one or the other."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import parse_settings


def test_the_upstreams_file_from_a_flag_or_the_environment() -> None:
    assert parse_settings(["--upstreams-file", "/etc/u.toml"], {}).upstreams_file == Path(
        "/etc/u.toml"
    )
    env = {"GATEWAY_UPSTREAMS_FILE": "/etc/u.toml"}
    assert parse_settings([], env).upstreams_file == Path("/etc/u.toml")
    assert parse_settings([], {}).upstreams_file is None
    assert parse_settings([], {}).upstreams == ("http://127.0.0.1:8000",)  # the default list


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--upstreams", "http://a:1", "--upstreams-file", "u.toml"], {}),
        (["--upstreams-file", "u.toml"], {"UPSTREAMS": "http://a:1"}),
        (["--upstreams", "http://a:1"], {"GATEWAY_UPSTREAMS_FILE": "u.toml"}),
    ],
)
def test_a_list_and_a_file_together_are_refused(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_settings(argv, env)
    assert exited.value.code == 2
    assert "give --upstreams (UPSTREAMS) or --upstreams-file" in capsys.readouterr().err
