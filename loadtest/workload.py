"""What the load tests send: per-task prompts and request shapes, mixes, and arrival traces.

Shared by the Locust users (``loadtest/locustfile.py``) and the SLO benchmark
(``loadtest/slo.py``), so both send the same requests. Two targets:

- the gateway: ``model`` is the task name; the gateway adds the system prompt, the limits
  and the priority;
- vLLM directly: the body the gateway would have sent, built with the gateway's own
  :func:`gateway.protocol.build_upstream_body` from the task table, with a fixed priority
  (``class``: the class's head start, no aging; ``fcfs``: 0 for everyone, which vLLM's
  priority scheduler serves first-come first-served because ties go to the earlier arrival).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gateway.classes import to_vllm_priority
from gateway.config import Config
from gateway.protocol import build_upstream_body, granted_max_tokens, parse_request

Target = Literal["gateway", "vllm"]
PriorityMode = Literal["class", "fcfs"]


@dataclass(frozen=True, slots=True)
class TaskLoad:
    """How the load tests exercise one task: streamed or not, how long, with which prompts."""

    task: str
    stream: bool
    max_tokens: int | None  # None: the task's own default
    prompts: tuple[str, ...]


SENTIMENT_TEXTS = (
    "I absolutely love this phone, the battery lasts for days.",
    "这家餐厅太难吃了，再也不来了。",
    "The delivery was late and the box was crushed.",
    "What a fantastic, delightful experience from start to finish!",
    "客服态度非常好，问题很快就解决了。",
    "The movie was boring and far too long.",
    "Great value for the price, I would buy it again.",
    "屏幕有划痕，包装也破了，很失望。",
    "The hotel staff went out of their way to help us.",
    "My order was wrong twice and nobody apologised.",
    "这本书写得真好，我一口气读完了。",
    "The app keeps crashing every time I open it.",
)

CHAT_PROMPTS = (
    "Explain how a hash map works and when it is a bad choice.",
    "What are three good habits for writing maintainable Python code? Explain each briefly.",
    "请介绍一下北京的三个著名景点，并说明它们的特点。",
    "How does TCP congestion control work, in simple terms?",
    "Give me a short plan for learning to cook at home in one month.",
    "What is the difference between a process and a thread?",
    "请解释一下什么是机器学习，并举两个例子。",
    "Why is the sky blue? Explain it for a curious teenager.",
)

SUMMARIZE_TEXTS = (
    "The city council met on Tuesday to discuss the new public transport plan. After three hours "
    "of debate, members agreed to extend two bus lines into the northern suburbs, add night "
    "services on weekends, and study a tram line along the river. Critics said the plan does not "
    "go far enough to reduce traffic in the centre, while shop owners worried about construction "
    "work. The mayor promised a public consultation in the spring and said the first changes "
    "would start in September, funded partly by a regional grant and partly by higher parking fees.",
    "Researchers at a university lab have developed a battery that charges in under ten minutes "
    "and keeps 90 percent of its capacity after two thousand cycles. The design replaces the "
    "graphite anode with a porous silicon structure that tolerates swelling. The team says the "
    "materials are cheap, but manufacturing at scale remains a challenge, and independent tests "
    "are still needed. Car makers have shown interest, though none has committed to using it.",
    "今年夏天，南方多地出现持续高温天气，部分城市最高气温超过四十度。气象部门提醒市民减少午后外出，"
    "注意防暑降温。电力公司表示，用电负荷连创新高，但供电总体平稳。农业部门则担心高温少雨会影响水稻"
    "生长，已组织技术人员下乡指导抗旱。专家预计，高温天气还将持续一周左右，之后随着冷空气南下，"
    "气温将逐步回落。",
    "The software team spent the last sprint migrating the billing service to a new database. "
    "The migration itself went smoothly, but two reports ran much slower afterwards because an "
    "index was missing. Customers noticed delayed invoices for one day. The team added the index, "
    "wrote a runbook for future migrations, and agreed to run load tests on a copy of production "
    "data before any schema change. The next sprint will focus on the reporting dashboard.",
)

BATCH_PROMPTS = (
    "Write a detailed essay of at least 300 words about the history of the printing press and "
    "its effects on science, religion and politics.",
    "Write a long, detailed guide for a beginner who wants to start running: equipment, "
    "training plan, food, injuries and motivation.",
    "请写一篇不少于三百字的文章，详细介绍长城的历史、建造方式以及它在今天的意义。",
    "Write a detailed product description and user manual for an imaginary smart kettle, with "
    "sections for setup, daily use, cleaning, safety and troubleshooting.",
    "Write a long story about a lighthouse keeper who finds a message in a bottle. Include "
    "dialogue and describe the sea in detail.",
    "Explain in detail, with examples, how a compiler turns source code into machine code: "
    "lexing, parsing, semantic analysis, optimisation and code generation.",
)

CODE_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a SQL query that finds the five customers with the highest total order value.",
    "Write a bash one-liner that counts lines in all .py files under the current directory.",
)

TRANSLATE_TEXTS = (
    "The meeting has been moved to Thursday afternoon.",
    "今天天气很好，我们去公园散步吧。",
    "Please send me the report before the end of the week.",
)

LOADS: dict[str, TaskLoad] = {
    load.task: load
    for load in (
        TaskLoad("sentiment", stream=False, max_tokens=None, prompts=SENTIMENT_TEXTS),
        TaskLoad("chat", stream=True, max_tokens=64, prompts=CHAT_PROMPTS),
        TaskLoad("code", stream=True, max_tokens=96, prompts=CODE_PROMPTS),
        TaskLoad("summarize", stream=True, max_tokens=128, prompts=SUMMARIZE_TEXTS),
        TaskLoad("translate", stream=False, max_tokens=64, prompts=TRANSLATE_TEXTS),
        TaskLoad("batch", stream=True, max_tokens=200, prompts=BATCH_PROMPTS),
        TaskLoad("assist", stream=False, max_tokens=64, prompts=SENTIMENT_TEXTS),
    )
}


def parse_mix(text: str) -> dict[str, float]:
    """``"sentiment=5,chat=3,batch=1"`` -> weights by task. Unknown tasks are an error."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, weight = part.partition("=")
        name = name.strip()
        if name not in LOADS:
            raise ValueError(f"unknown task {name!r} in mix; known: {', '.join(LOADS)}")
        value = float(weight) if sep else 1.0
        if value < 0:
            raise ValueError(f"negative weight for {name!r}")
        if value > 0:
            mix[name] = value
    if not mix:
        raise ValueError(f"the mix {text!r} names no task with a positive weight")
    return mix


def client_body(load: TaskLoad, prompt: str, seed: int, prefix: str = "") -> dict[str, Any]:
    """What a client sends the gateway for this task (``model`` is the task's name).

    ``prefix`` is prepended to the user's text: the SLO benchmark gives every run its own, so
    vLLM's prefix cache cannot carry one configuration's prompts into the next.
    """
    body: dict[str, Any] = {
        "model": load.task,
        "messages": [{"role": "user", "content": prefix + prompt}],
        "seed": seed,
    }
    if load.max_tokens is not None:
        body["max_tokens"] = load.max_tokens
    if load.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def vllm_body(
    config: Config, body: Mapping[str, Any], model: str, priority: PriorityMode
) -> dict[str, Any]:
    """The body the gateway would send vLLM for ``body``, with a static priority.

    Built by the gateway's own code, so the only difference from going through the gateway
    is what the gateway adds at dispatch time (queueing, aging, deadlines, degrade).
    """
    task = config.tasks[str(body["model"])]
    if task.pipeline is not None:
        raise ValueError(f"{task.name} is a two-step pipeline; only the gateway can run it")
    request = parse_request("chat", body)
    head_start = config.classes[task.priority_class].head_start_s
    return build_upstream_body(
        task,
        request,
        max_tokens=granted_max_tokens(task, request),
        priority=to_vllm_priority(head_start) if priority == "class" else 0,
        model=model,
    )


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of an open-loop trace: when it is sent (seconds from the run's start)."""

    index: int
    at: float
    task: str
    prompt: str
    seed: int


def poisson_trace(
    rate: float, duration_s: float, mix: Mapping[str, float], seed: int
) -> list[Arrival]:
    """Poisson arrivals at ``rate`` per second for ``duration_s``, tasks in ``mix``'s shares.

    Conditioned on the expected count: exactly ``round(rate * duration_s)`` arrivals at
    independent uniform times (given its count, a Poisson process is exactly that), and the
    tasks in the mix's proportions, shuffled. Short runs then offer the load and the mix
    they are labelled with (an unconditioned 60 s trace at 1.2/s holds anywhere from 50 to
    95 requests) and keep Poisson's bursts. Deterministic in ``seed``: every configuration
    of a benchmark replays the same trace.
    """
    rng = random.Random(seed)
    count = round(rate * duration_s)
    times = sorted(rng.uniform(0, duration_s) for _ in range(count))
    tasks = _apportion(mix, count)
    rng.shuffle(tasks)
    return [
        Arrival(i, t, task, rng.choice(LOADS[task].prompts), rng.randrange(2**31))
        for i, (t, task) in enumerate(zip(times, tasks, strict=True))
    ]


def _apportion(mix: Mapping[str, float], count: int) -> list[str]:
    """``count`` task names in the mix's proportions (largest remainders get the rest)."""
    total = sum(mix.values())
    quotas = {name: count * weight / total for name, weight in mix.items()}
    shares = {name: int(q) for name, q in quotas.items()}
    by_remainder = sorted(mix, key=lambda n: quotas[n] - shares[n], reverse=True)
    for name in by_remainder[: count - sum(shares.values())]:
        shares[name] += 1
    return [name for name, n in shares.items() for _ in range(n)]


def arrivals(rate: float, mix: Mapping[str, float], seed: int) -> Iterator[Arrival]:
    """An endless Poisson stream (take what you need: a closed loop ignores the times)."""
    rng = random.Random(seed)
    names, weights = list(mix), list(mix.values())
    t = 0.0
    for index in itertools.count():
        t += rng.expovariate(rate)
        task = rng.choices(names, weights)[0]
        prompt = rng.choice(LOADS[task].prompts)
        yield Arrival(index, t, task, prompt, rng.randrange(2**31))
