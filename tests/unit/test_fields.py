"""The client's knobs: forwarded as vLLM takes them, refused when vLLM does not serve them,
and not read at all when they change nothing."""

from __future__ import annotations

import pytest

from gateway.errors import BadRequest
from gateway.fields import refuse_unsupported, sampling


def test_output_changing_fields_are_forwarded_as_vllm_means_them() -> None:
    body = {"logit_bias": {"42": -100}, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}
    assert sampling(body, chat=True) == {
        "logit_bias": {"42": -100.0},
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
    }
    completions = {"prompt": "a", "logprobs": 2, "echo": True}
    assert sampling(completions, chat=False) == {"logprobs": 2, "echo": True}
    with pytest.raises(BadRequest) as info:
        refuse_unsupported({"prompt": "a", "suffix": "b"})
    assert (info.value.code, info.value.param) == ("unsupported_parameter", "suffix")
    # Metadata that changes nothing is not read.
    meta = {"user": "u", "metadata": {"a": "b"}, "store": True, "service_tier": "auto"}
    refuse_unsupported(meta)
    assert sampling(meta, chat=True) == {}
