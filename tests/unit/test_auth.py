from __future__ import annotations

from pathlib import Path

import pytest

from gateway.auth import KeyRing, TenantPolicy, TokenBucket, hash_key, load_keyring, main
from gateway.config import ConfigError
from gateway.errors import Forbidden, RateLimited, Unauthorized


def ring(**policy: object) -> KeyRing:
    return KeyRing({"acme": TenantPolicy("acme", **policy)}, [(hash_key("sk-good"), "acme")])  # type: ignore[arg-type]


def test_no_keys_means_everyone_is_the_anonymous_tenant() -> None:
    keys = KeyRing({}, [])
    assert not keys.enabled
    assert keys.identify(None).name == ""


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Basic sk-good", "Bearer sk-bad", "Bearer  "]
)
def test_missing_or_wrong_keys_are_401(header: str | None) -> None:
    with pytest.raises(Unauthorized):
        ring().identify(header)


def test_a_good_key_names_its_tenant() -> None:
    assert ring().identify("Bearer sk-good").name == "acme"
    assert ring().identify("bearer sk-good").name == "acme"


def test_tasks_outside_the_allowed_set_are_403() -> None:
    tenant = ring(tasks=frozenset({"sentiment"})).identify("Bearer sk-good")
    tenant.check_task("sentiment")
    with pytest.raises(Forbidden):
        tenant.check_task("batch")


def test_request_rate_limit_with_retry_after() -> None:
    tenant = ring(requests_per_s=2.0).identify("Bearer sk-good")
    tenant.admit(0.0)
    tenant.admit(0.0)
    with pytest.raises(RateLimited) as info:
        tenant.admit(0.1)
    assert info.value.code == "rate_limited"
    assert info.value.headers["Retry-After"] == "1"
    tenant.admit(1.0)  # refilled


def test_token_rate_is_charged_after_the_answer_and_blocks_while_in_debt() -> None:
    tenant = ring(tokens_per_s=100.0).identify("Bearer sk-good")
    tenant.admit(0.0)
    tenant.done(0.0, tokens=400)  # 100 in the bucket, 400 used: 300 in debt
    with pytest.raises(RateLimited) as info:
        tenant.admit(1.0)
    assert info.value.headers["Retry-After"] == "2"
    tenant.admit(3.0)


def test_concurrency_cap() -> None:
    tenant = ring(max_concurrent=1).identify("Bearer sk-good")
    tenant.admit(0.0)
    with pytest.raises(RateLimited) as info:
        tenant.admit(0.0)
    assert info.value.code == "concurrency"
    tenant.done(0.0, tokens=0)
    tenant.admit(0.0)


def test_token_bucket_refills_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=10.0)
    bucket.take(0.0, 10.0)
    assert bucket.wait_s(0.5, 10.0) == pytest.approx(0.5)
    assert bucket.wait_s(100.0, 10.0) == 0.0
    assert bucket.level == 10.0


def test_keys_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(
        f'[tenants.acme]\nkeys = ["{hash_key("sk-file")}"]\ntasks = ["chat"]\nmax_class = "standard"\n'
        "requests_per_s = 5\nmax_concurrent = 2\nweight = 2.5\n"
    )
    keys = load_keyring(path, "beta:sk-env, acme:sk-extra")
    assert keys.identify("Bearer sk-file").policy.max_class == "standard"
    assert keys.weights() == {"acme": 2.5, "beta": 1.0}  # shares of a class (fairness)
    assert keys.identify("Bearer sk-extra").name == "acme"
    assert keys.identify("Bearer sk-env").policy.tasks is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[tenants.a]\nkeys = ["plain-key"]\n', "hashed keys"),
        ('[tenants.a]\nkeys = ["sha256:ab"]\nmax_class = "vip"\n', "max_class"),
        ('[tenants.a]\nkeys = ["sha256:ab"]\nrequests_per_s = -1\n', "positive"),
        ('[tenants.a]\nkeys = ["sha256:ab"]\nweight = 0\n', "weight must be a positive"),
        ('[tenants.a]\nkeys = ["sha256:ab"]\nweight = inf\n', "weight must be a positive"),
        ('[tenants.a]\nkeys = ["sha256:ab"]\nweight = nan\n', "weight must be a positive"),
        ('[tenants.a]\nkeys = ["sha256:ab"]\nlimit = 3\n', "unknown key"),
    ],
)
def test_invalid_keys_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_keyring(path, None)
    with pytest.raises(ConfigError):
        load_keyring(None, "no-colon")


def test_hash_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash", "sk-x"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("sk-x")
    assert main([]) == 2
