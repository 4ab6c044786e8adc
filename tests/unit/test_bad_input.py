"""Bad input: whatever a client sends, the gateway answers 4xx in OpenAI's envelope, never 5xx.

Generated bodies (random JSON, near-valid chat and completions requests with wrong types and
absurd values, broken bytes, deep nesting) and generated headers go through a real gateway on
a socket in front of the fake vLLM, which is healthy, so no 5xx is ever expected: the only
5xx allowed is a 504 for a request that asked for a tight ``X-Request-Deadline-Ms``.

Content-Type is not checked: the body is parsed as JSON whatever the header says (OpenAI
clients always send JSON; curl's default ``-d`` sends form-urlencoded).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import load_config
from gateway.errors import BadRequest
from gateway.fields import MAX_DEPTH
from gateway.protocol import parse_json
from tests.fake_vllm import FakeVllm
from tests.unit.conftest import GatewayFactory

CONFIG = load_config()
TASKS = CONFIG.task_names()
CLASSES = CONFIG.classes.names()
KEY = "sk-bad-input-test"
USER = [{"role": "user", "content": "I love this phone"}]
TIMEOUT_S = 10.0

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one gateway serves every example
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

# -- strategies -----------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Numbers that are wrong in every way: huge, negative, zero, floats, bools, strings, 400 digits.
odd_numbers = (
    st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from(
        [0, -1, 1, 2, 2**31, 2**63, 2**64, 10**400, -(10**400), 1.5, 1e300, True, False]
    )
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
    | json_values
)
content_parts = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["text", "image_url", "input_audio", "refusal", ""])
            | json_values
        },
        optional={"text": st.text(max_size=30) | json_values, "image_url": json_values},
    ),
    max_size=4,
)
contents = st.text(max_size=60) | st.none() | content_parts | json_values
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard", ""])
messages_one = (
    st.fixed_dictionaries(
        {"role": roles | json_values, "content": contents},
        optional={"name": json_values, "tool_calls": json_values, "tool_call_id": json_values},
    )
    | json_values
)
messages = (
    st.lists(messages_one, max_size=5)
    | st.sampled_from([1, 1024, 1025, 5000]).map(lambda k: [{"role": "user", "content": "x"}] * k)
    | st.integers(min_value=1, max_value=20_000).map(
        lambda k: [{"role": "user", "content": "é" * k}]
    )
    | json_values
)
models = st.sampled_from([*TASKS, "gpt-4o", "", "SENTIMENT"]) | json_values
sampling = {
    "max_tokens": odd_numbers,
    "max_completion_tokens": odd_numbers,
    "n": odd_numbers,
    "temperature": odd_numbers,
    "top_p": odd_numbers,
    "presence_penalty": odd_numbers,
    "seed": odd_numbers,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values})
    | json_values,
    "stop": st.lists(st.text(max_size=5), max_size=6) | json_values,
    "logprobs": st.booleans() | json_values,
    "top_logprobs": odd_numbers,
    "response_format": st.fixed_dictionaries({"type": json_values}) | json_values,
    "priority": odd_numbers,  # vLLM-only fields must be dropped, not forwarded
    "structured_outputs": json_values,
}
unknown_fields = st.dictionaries(st.text(max_size=10), json_values, max_size=3)


def _merge(parts: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    return {**parts[1], **parts[0]}


chat_bodies = st.tuples(
    st.fixed_dictionaries({"model": models, "messages": messages}, optional=sampling),
    unknown_fields,
).map(_merge)
completion_bodies = st.tuples(
    st.fixed_dictionaries(
        {
            "model": models,
            "prompt": st.text(max_size=40) | st.lists(st.text(max_size=5)) | json_values,
        },
        optional=sampling,
    ),
    unknown_fields,
).map(_merge)


def _nested(depth: int) -> bytes:
    return b'{"model": "chat", "messages": ' + b"[" * depth + b"]" * depth + b"}"


def _nested_format(depth: int) -> bytes:
    inner = b'{"a": ' * depth + b"1" + b"}" * depth
    return (
        b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object", "schema": '
        + inner
        + b"}}"
    )


def _break(raw: bytes, cut: int, junk: bytes) -> bytes:
    at = cut % (len(raw) + 1)
    return raw[:at] + junk + raw[at:]


encoded = (chat_bodies | completion_bodies).map(
    lambda b: json.dumps(b, ensure_ascii=False).encode()
)
raw_bodies = (
    encoded
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=200)
    | st.tuples(
        encoded,
        st.integers(min_value=0),
        st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"}", b"NaN"]),
    ).map(lambda t: _break(*t))
    | st.integers(min_value=1, max_value=3000).map(_nested)
    | st.integers(min_value=MAX_DEPTH - 2, max_value=1200).map(_nested_format)
    | st.sampled_from(
        [
            b"",
            b" ",
            b"null",
            b"[]",
            b'"text"',
            b"{}",
            b'{"model": "chat", "messages": [{"role": "user", "content": "\\ud800"}]}',
        ]
    )
)

# Header values h11 will send: visible ASCII, Latin-1 and UTF-8 bytes, spaces inside.
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
    max_size=24,
)
header_values = header_text.map(lambda s: s.encode("utf-8").strip(b" ")) | st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=24,
).map(lambda s: s.encode("latin-1"))
headers = st.fixed_dictionaries(
    {},
    optional={
        "X-Task": st.sampled_from(TASKS).map(str.encode) | header_values,
        "X-Priority": st.sampled_from(CLASSES).map(str.encode) | header_values,
        "X-Request-Deadline-Ms": st.integers(min_value=-(10**6), max_value=10**30).map(
            lambda n: str(n).encode()
        )
        | header_values,
        "X-Request-Id": header_values,
        "Content-Type": st.sampled_from(
            [
                b"application/json",
                b"text/plain",
                b"application/x-www-form-urlencoded",
                b"application/json; charset=latin-1",
            ]
        )
        | header_values,
        "Authorization": st.just(f"Bearer {KEY}".encode())
        | header_values.map(lambda v: (b"Bearer " + v).strip())
        | header_values,
    },
)

# -- checks -------------------------------------------------------------------------------


def assert_envelope(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str), error
    assert error["message"], error
    assert isinstance(error["type"], str), error
    assert error["type"], error
    return error  # type: ignore[no-any-return]


def _deadline_limited(sent: dict[str, bytes], error: dict[str, Any]) -> bool:
    """A 504 is the right answer when the client asked for a deadline it could not get."""
    return "X-Request-Deadline-Ms" in sent and error["code"] == "deadline_exceeded"


async def exchange(
    client: httpx.AsyncClient, path: str, content: bytes, sent: dict[str, bytes]
) -> None:
    """Send one request and check the answer; a hang fails the test after TIMEOUT_S."""
    async with asyncio.timeout(TIMEOUT_S):
        response = await client.post(path, content=content, headers=sent)
    assert response.headers.get("x-request-id")
    if response.is_success:
        if response.headers["content-type"].startswith("text/event-stream"):
            events = [e for e in response.text.split("\n\n") if e]
            assert events[-1] == "data: [DONE]", events[-3:]
            for event in events:
                data = json.loads(event.removeprefix("data: ")) if event != "data: [DONE]" else {}
                if "error" in data:  # in band: only a deadline the client asked for
                    assert _deadline_limited(sent, data["error"]), data
        else:
            assert "choices" in response.json()
        return
    error = assert_envelope(response)
    assert response.status_code < 500 or (
        response.status_code == 504 and _deadline_limited(sent, error)
    ), (response.status_code, error)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
async def keyed_client(start_gateway: GatewayFactory) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway with API keys, so Authorization is checked."""
    async with (
        start_gateway(env_keys=f"acme:{KEY}") as url,
        httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S) as c,
    ):
        yield c


@pytest.fixture
async def small_limit(start_gateway: GatewayFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        start_gateway(max_body_bytes=4096) as url,
        httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S) as c,
    ):
        yield c


# -- generated ----------------------------------------------------------------------------


@FUZZ
@given(body=raw_bodies, completions=st.booleans())
async def test_generated_bodies_are_answered_without_5xx(
    client: httpx.AsyncClient, body: bytes, completions: bool
) -> None:
    path = "/v1/completions" if completions else "/v1/chat/completions"
    await exchange(client, path, body, {"Content-Type": b"application/json"})


@FUZZ
@given(sent=headers, body=chat_bodies | completion_bodies)
async def test_generated_headers_are_answered_without_5xx(
    keyed_client: httpx.AsyncClient, sent: dict[str, bytes], body: dict[str, Any]
) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    await exchange(keyed_client, path, json.dumps(body).encode(), sent)


# -- explicit -----------------------------------------------------------------------------


def _padded(size: int) -> bytes:
    """A valid chat body of exactly ``size`` bytes (JSON allows trailing whitespace)."""
    raw = json.dumps({"model": "chat", "messages": USER}).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


async def _chunks(raw: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(raw), 1000):
        yield raw[i : i + 1000]


async def test_a_body_at_the_size_limit_is_served_and_one_byte_more_is_413(
    small_limit: httpx.AsyncClient,
) -> None:
    c = small_limit
    assert (await c.post("/v1/chat/completions", content=_padded(4096))).status_code == 200
    over = await c.post("/v1/chat/completions", content=_padded(4097))
    assert over.status_code == 413
    assert assert_envelope(over)["code"] == "body_too_large"
    # Without a Content-Length (chunked), the limit is enforced while reading.
    chunked = await c.post("/v1/chat/completions", content=_chunks(_padded(4096)))
    assert chunked.status_code == 200
    chunked_over = await c.post("/v1/chat/completions", content=_chunks(_padded(4097)))
    assert chunked_over.status_code == 413
    assert assert_envelope(chunked_over)["code"] == "body_too_large"


async def test_n_above_one_is_400(client: httpx.AsyncClient, fake: FakeVllm) -> None:
    r = await client.post("/v1/chat/completions", json={"model": "chat", "messages": USER, "n": 2})
    assert r.status_code == 400
    error = assert_envelope(r)
    assert (error["param"], error["code"]) == ("n", "unsupported_value")
    assert not fake.seen


@pytest.mark.parametrize("role", [[], {}, ["user"], 1, None, True])
async def test_a_role_of_the_wrong_type_is_400(client: httpx.AsyncClient, role: Any) -> None:
    body = {"model": "chat", "messages": [{"role": role, "content": "hi"}]}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400  # a list or an object once made a 500 (unhashable)
    assert assert_envelope(r)["param"] == "messages[0].role"


@pytest.mark.parametrize(
    "asked", [1025, 10**6, 2**63, 10**400], ids=["1025", "1e6", "2^63", "1e400"]
)
async def test_huge_max_tokens_is_clamped_to_the_tasks_limit(
    client: httpx.AsyncClient, fake: FakeVllm, asked: int
) -> None:
    body = {"model": "chat", "messages": USER, "max_tokens": asked}
    r = await client.post("/v1/chat/completions", content=json.dumps(body))
    assert r.status_code == 200, r.text
    assert fake.seen[-1].body["max_tokens"] == CONFIG.tasks["chat"].max_tokens_limit


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_json_is_accepted_whatever_the_content_type(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    raw = json.dumps({"model": "sentiment", "messages": USER}).encode()
    r = await client.post("/v1/chat/completions", content=raw, headers=headers)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("raw", [b"", b"   ", b"\r\n"])
async def test_an_empty_body_is_400(client: httpx.AsyncClient, raw: bytes) -> None:
    r = await client.post("/v1/chat/completions", content=raw)
    assert r.status_code == 400
    assert assert_envelope(r)["code"] == "invalid_json"


async def test_a_lone_surrogate_is_400_and_a_surrogate_pair_is_text(
    client: httpx.AsyncClient, fake: FakeVllm
) -> None:
    lone = b'{"model": "chat", "messages": [{"role": "user", "content": "hi \\udc00"}]}'
    r = await client.post("/v1/chat/completions", content=lone)
    assert r.status_code == 400
    assert assert_envelope(r)["code"] == "invalid_json"
    pair = b'{"model": "chat", "messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}]}'
    r = await client.post("/v1/chat/completions", content=pair)
    assert r.status_code == 200, r.text
    assert fake.seen[-1].body["messages"][-1]["content"] == "hi \U0001f600"


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        (b'{"a": "\\ud800"}', False),
        (b'{"\\udfff": 1}', False),
        (b'{"a": [{"b": ["x", "\\ud83d"]}]}', False),
        (b'{"a": "\\ud83d\\ude00"}', True),
        (b'{"a": "\\\\ud800"}', True),  # an escaped backslash, then plain text
        (b'{"a": "\xed\xa0\x80"}', False),  # a surrogate encoded as if it were UTF-8
        (b'\xef\xbb\xbf{"a": "\xc3\xa9"}', True),  # a UTF-8 byte order mark is tolerated
    ],
)
def test_surrogates_are_refused_wherever_they_are(raw: bytes, ok: bool) -> None:
    if ok:
        parse_json(raw)
        return
    with pytest.raises(BadRequest) as info:
        parse_json(raw)
    assert info.value.code == "invalid_json"


async def test_forwarded_structures_have_bounded_nesting(client: httpx.AsyncClient) -> None:
    deep = await client.post("/v1/chat/completions", content=_nested_format(MAX_DEPTH))
    error = assert_envelope(deep)
    assert (deep.status_code, error["param"]) == (400, "response_format")
    fine = await client.post("/v1/chat/completions", content=_nested_format(MAX_DEPTH - 3))
    assert fine.status_code == 200, fine.text
    tool_calls = {
        "role": "assistant",
        "content": None,
        "tool_calls": [json.loads(b"[" * 100 + b"]" * 100)],
    }
    r = await client.post(
        "/v1/chat/completions", json={"model": "chat", "messages": [*USER, tool_calls]}
    )
    assert r.status_code == 400
    assert assert_envelope(r)["param"] == "messages[1].tool_calls"


async def test_an_absurd_deadline_header_is_not_a_500(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "chat", "messages": USER},
        headers={"X-Request-Deadline-Ms": "1" + "0" * 400},
    )
    assert r.status_code < 500
