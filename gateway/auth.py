"""API keys: who is calling, what they may do, and how fast.

Keys map to tenants. A tenant may be limited to some tasks, capped at a priority class, and
held to a request rate, a token rate and a number of concurrent requests. Keys are stored
hashed (sha256: they are random tokens, so a fast hash is enough) and compared in constant
time; they are never logged.

A keys file (``--keys PATH``) looks like this; every field but ``keys`` is optional::

    [tenants.acme]
    keys = ["sha256:<hex of sha256(key)>"]   # python -m gateway.auth hash <key>
    tasks = ["sentiment", "chat"]            # default: every task
    max_class = "interactive"                # default: realtime
    requests_per_s = 5                       # default: unlimited (burst: one second's worth)
    tokens_per_s = 500                       # prompt + completion tokens; default: unlimited
    max_concurrent = 4                       # queued + in flight; default: unlimited
    weight = 2                               # its shares of each class; default: 1

``GATEWAY_API_KEYS="acme:sk-one,beta:sk-two"`` adds plain keys from the environment (hashed
at start); a tenant named there but not in the file gets no limits.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.classes import CLASS_NAMES
from gateway.config import ConfigError
from gateway.errors import Forbidden, RateLimited, Unauthorized


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    name: str
    tasks: frozenset[str] | None = None
    max_class: str = "realtime"
    requests_per_s: float | None = None
    tokens_per_s: float | None = None
    max_concurrent: int | None = None
    weight: float = 1.0  # its shares of a class against other tenants (gateway.fairness)


@dataclass(slots=True)
class TokenBucket:
    """``rate`` per second, up to ``burst``. It may go into debt (tokens are known only after
    an answer); a request is refused while the bucket is below zero."""

    rate: float
    burst: float
    level: float = field(init=False)
    updated: float = field(default=-math.inf)

    def __post_init__(self) -> None:
        self.level = self.burst

    def refill(self, now: float) -> None:
        if self.updated != -math.inf:
            self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_s(self, now: float, amount: float) -> float:
        """Seconds until ``amount`` is available (0: take it now)."""
        self.refill(now)
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def take(self, now: float, amount: float) -> None:
        self.refill(now)
        self.level -= amount


@dataclass(slots=True)
class Tenant:
    """A tenant's policy and its live counters."""

    policy: TenantPolicy
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    active: int = 0

    @classmethod
    def of(cls, policy: TenantPolicy) -> Tenant:
        rps, tps = policy.requests_per_s, policy.tokens_per_s
        return cls(
            policy,
            TokenBucket(rps, max(rps, 1.0)) if rps else None,
            TokenBucket(tps, max(tps, 1.0)) if tps else None,
        )

    @property
    def name(self) -> str:
        return self.policy.name

    def admit(self, now: float) -> None:
        """Count one request against the limits; RateLimited if it is over one."""
        p = self.policy
        if p.max_concurrent is not None and self.active >= p.max_concurrent:
            raise RateLimited(
                f"tenant {p.name} has {self.active} requests in progress "
                f"(limit {p.max_concurrent})",
                code="concurrency",
                retry_after_s=1,
            )
        for bucket, what in ((self.requests, "request"), (self.tokens, "token")):
            if (
                bucket is not None
                and (wait := bucket.wait_s(now, 1.0 if what == "request" else 0.0)) > 0
            ):
                raise RateLimited(
                    f"tenant {p.name} is over its {what} rate; retry after {math.ceil(wait)} s",
                    code="rate_limited",
                    retry_after_s=max(math.ceil(wait), 1),
                )
        if self.requests is not None:
            self.requests.take(now, 1.0)
        self.active += 1

    def undo_admit(self, now: float) -> None:
        """Give back what :meth:`admit` took: the request was refused after all (by the
        limits shared with other gateways, see gateway.shared_limits)."""
        self.active -= 1
        if self.requests is not None:
            self.requests.take(now, -1.0)

    def done(self, now: float, tokens: int) -> None:
        self.active -= 1
        if self.tokens is not None and tokens:
            self.tokens.take(now, float(tokens))

    def check_task(self, task: str) -> None:
        if self.policy.tasks is not None and task not in self.policy.tasks:
            raise Forbidden(f"this API key may not use the task {task!r}", code="task_not_allowed")

    def ceiling(self) -> str:
        return self.policy.max_class


class KeyRing:
    """Stored key digests and their tenants; empty means authentication is off."""

    def __init__(
        self, policies: Mapping[str, TenantPolicy], digests: list[tuple[str, str]]
    ) -> None:
        self.tenants = {name: Tenant.of(policy) for name, policy in policies.items()}
        self._digests = [(digest.encode(), tenant) for digest, tenant in digests]
        self.anonymous = Tenant.of(TenantPolicy(""))  # everyone, when no keys are configured

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def weights(self) -> dict[str, float]:
        """Each tenant's shares of a class (gateway.fairness)."""
        return {name: t.policy.weight for name, t in self.tenants.items()}

    def identify(self, authorization: str | None) -> Tenant:
        """The tenant whose key is in ``Authorization: Bearer <key>``; Unauthorized otherwise."""
        if not self.enabled:
            return self.anonymous
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized(
                "an API key is required: Authorization: Bearer <key>", code="missing_api_key"
            )
        presented = hash_key(key.strip()).encode()
        found = None
        for digest, tenant in self._digests:  # every digest, so timing does not tell which matched
            if hmac.compare_digest(digest, presented):
                found = tenant
        if found is None:
            raise Unauthorized("the API key is not valid", code="invalid_api_key")
        return self.tenants[found]


def load_keyring(path: Path | None, env_keys: str | None) -> KeyRing:
    """Read the keys file and the environment's keys; ConfigError names what is wrong."""
    policies: dict[str, TenantPolicy] = {}
    digests: list[tuple[str, str]] = []
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read keys file {path}: {exc}") from exc
        for name, body in raw.get("tenants", {}).items():
            policy, keys = _tenant(name, body)
            policies[name] = policy
            digests.extend((key, name) for key in keys)
    for entry in filter(None, (e.strip() for e in (env_keys or "").split(","))):
        name, sep, key = entry.partition(":")
        if not sep or not name or not key:
            raise ConfigError("GATEWAY_API_KEYS entries must look like tenant:key")
        policies.setdefault(name, TenantPolicy(name))
        digests.append((hash_key(key), name))
    return KeyRing(policies, digests)


def _tenant(name: str, body: Any) -> tuple[TenantPolicy, list[str]]:
    where = f"tenants.{name}"
    if not isinstance(body, Mapping):
        raise ConfigError(f"{where} must be a table")
    unknown = set(body) - {
        "keys",
        "tasks",
        "max_class",
        "requests_per_s",
        "tokens_per_s",
        "max_concurrent",
        "weight",
    }
    if unknown:
        raise ConfigError(f"unknown key {where}.{sorted(unknown)[0]}")
    keys = body.get("keys")
    if (
        not isinstance(keys, list)
        or not keys
        or not all(isinstance(k, str) and k.startswith("sha256:") for k in keys)
    ):
        raise ConfigError(
            f"{where}.keys must list hashed keys (sha256:<hex>); see python -m gateway.auth hash"
        )
    tasks = body.get("tasks")
    if tasks is not None and not (
        isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)
    ):
        raise ConfigError(f"{where}.tasks must be a list of task names")
    max_class = body.get("max_class", "realtime")
    if max_class not in CLASS_NAMES:
        raise ConfigError(f"{where}.max_class must be one of {', '.join(CLASS_NAMES)}")
    limits: dict[str, float | None] = {}
    for field_name in ("requests_per_s", "tokens_per_s", "max_concurrent", "weight"):
        value = body.get(field_name)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 < value < math.inf  # nan and inf too: a weight divides service
        ):
            raise ConfigError(f"{where}.{field_name} must be a positive number")
        limits[field_name] = value
    concurrent = limits["max_concurrent"]
    return (
        TenantPolicy(
            name=name,
            tasks=frozenset(tasks) if tasks is not None else None,
            max_class=max_class,
            requests_per_s=limits["requests_per_s"],
            tokens_per_s=limits["tokens_per_s"],
            max_concurrent=int(concurrent) if concurrent is not None else None,
            weight=float(limits["weight"] or 1.0),
        ),
        keys,
    )


def main(argv: list[str]) -> int:
    """``python -m gateway.auth hash <key>``: the line to put in a keys file."""
    if len(argv) != 2 or argv[0] != "hash":
        print("usage: python -m gateway.auth hash <key>", file=sys.stderr)
        return 2
    print(hash_key(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
