"""The upstreams file: what it accepts, and the ConfigError for everything it refuses."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gateway.config import ConfigError
from gateway.upstreams_file import DnsEntry, UrlEntry, load_upstreams_file, parse_upstreams

GOOD = """
[[upstream]]
url = "http://10.0.0.5:8000/"

[[upstream]]
dns = "vllm-headless.default.svc.cluster.local"
port = 8000

[[upstream]]
dns = "vllm-tls"
port = 8443
scheme = "https"
overflow = true

[[upstream]]
url = "https://10.0.0.9:8000"
overflow = true
"""


def test_a_good_file_gives_its_entries_in_order(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text(GOOD)
    assert load_upstreams_file(path) == (
        UrlEntry("http://10.0.0.5:8000"),  # the trailing slash is dropped, as --upstreams does
        DnsEntry("vllm-headless.default.svc.cluster.local", 8000, "http"),
        DnsEntry("vllm-tls", 8443, "https", overflow=True),
        UrlEntry("https://10.0.0.9:8000", overflow=True),
    )


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "needs at least one [[upstream]]"),
        ("upstream = []", "needs at least one [[upstream]]"),
        ('upstreams = [{url = "http://a:1"}]', "unknown top-level key(s) upstreams"),
        ('upstream = ["http://a:1"]', "upstream #1: must be a table"),
        ('[[upstream]]\nurl = "http://a:1"\nweight = 2', "unknown key(s) weight"),
        ("[[upstream]]\noverflow = true", "give exactly one of url or dns"),
        ('[[upstream]]\nurl = "http://a:1"\ndns = "b"\nport = 1', "exactly one of url or dns"),
        ('[[upstream]]\nurl = "http://a:1"\nport = 1', "port goes with dns"),
        ('[[upstream]]\nurl = "a:8000"', "url must be http(s)://host[:port]"),
        ('[[upstream]]\nurl = "ftp://a:8000"', "url must be http(s)://host[:port]"),
        ('[[upstream]]\nurl = "http://a:99999"', "url 'http://a:99999' is invalid"),
        ('[[upstream]]\nurl = "http://a:1?x=1"', "must not have a query"),
        ("[[upstream]]\nurl = 8000", "url must be a string"),
        ('[[upstream]]\ndns = "vllm"', "port is required with dns"),
        ('[[upstream]]\ndns = "vllm"\nport = 0', "port must be an integer from 1 to 65535"),
        ('[[upstream]]\ndns = "vllm"\nport = "80"', "port must be an integer"),
        ('[[upstream]]\ndns = "http://vllm"\nport = 80', "dns must be a host name"),
        ('[[upstream]]\ndns = "vllm"\nport = 80\nscheme = "grpc"', "scheme must be http or https"),
        ('[[upstream]]\nurl = "http://a:1"\noverflow = "yes"', "overflow must be true or false"),
        ('[[upstream]]\nurl = "http://a:1"\n[[upstream]]\nurl = "http://a:1/"', "listed twice"),
    ],
)
def test_an_invalid_file_is_a_config_error_naming_the_problem(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_upstreams(tomllib.loads(text), "upstreams.toml")
    assert complaint in str(caught.value)
    assert str(caught.value).startswith("upstreams.toml")


def test_a_missing_or_malformed_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the upstreams file"):
        load_upstreams_file(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[upstream]\nurl =")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_upstreams_file(bad)
