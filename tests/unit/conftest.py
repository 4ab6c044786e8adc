from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import httpx
import pytest

from gateway.config import Config
from gateway.settings import Settings
from tests.fake_vllm import FakeVllm
from tests.servers import running_gateway

GatewayFactory = Callable[..., AbstractAsyncContextManager[str]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeVllm]:
    upstream = FakeVllm()
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
def start_gateway(fake: FakeVllm) -> GatewayFactory:
    """Start a gateway in front of the fake with some settings changed: ``async with start_gateway(window=1) as url``."""

    def start(config: Config | None = None, **changes: object) -> AbstractAsyncContextManager[str]:
        base: dict[str, object] = {
            "upstreams": (fake.url,),
            "window": 4,
            "window_mode": "fixed",  # scheduling tests count slots; test_sizing adapts it
            "health_interval_s": 0.2,
            "access_log": False,
        }
        return running_gateway(Settings(**{**base, **changes}), config)  # type: ignore[arg-type]

    return start


@pytest.fixture
async def gateway(start_gateway: GatewayFactory) -> AsyncIterator[str]:
    async with start_gateway() as url:
        yield url


@pytest.fixture
async def client(gateway: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway, timeout=20) as c:
        yield c


@pytest.fixture(scope="session")
def promtool() -> str:
    """Debian's ``prometheus`` package's promtool (launch/test.sh installs it)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's `prometheus` package (launch/test.sh)")
    return path
