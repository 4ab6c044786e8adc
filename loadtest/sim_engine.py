"""A model of vLLM's continuous batching, for a simulated vLLM (``loadtest/sim_vllm.py``).

SIMULATION, not a GPU: this decides when each token of each request would come out of a
vLLM engine, from a cost model of one engine step. It holds no clock; whoever drives it
(the server's step loop in real time, or a replay in virtual time) calls :meth:`Engine.step`,
waits the step's ``duration`` and then delivers the step's tokens. So the model is pure and
its tests need no sleeps.

One step, as vLLM's V1 scheduler builds it:

1. Running requests first, in the order they were admitted: each gets one decode token, or
   the next chunk of its prompt (chunked prefill) while its prompt is not yet read, within
   ``max_batched_tokens`` for the whole step. A request that needs a new KV-cache block
   when none is free preempts the least important running request (``priority`` policy:
   the largest ``(priority, arrival)``; ``fcfs``: the last admitted), which goes back to the
   waiting queue and later recomputes its prompt and what it had generated.
2. Then waiting requests, in queue order, while fewer than ``max_num_seqs`` run, the token
   budget lasts and the KV cache holds the request's prompt. The queue is ordered by
   ``(priority, arrival)`` under the ``priority`` policy (lower value first, as vLLM) and by
   arrival under ``fcfs``. The head blocks the queue: if it does not fit, nothing behind it
   is admitted (vLLM does the same).
3. A waiting request never preempts a running one, however important (vLLM issue 40004):
   only KV-cache exhaustion preempts.
4. The step costs ``base + per_seq x requests in the batch + per_prefill_token x prompt
   tokens read + per_context_token x context tokens attended by the decoding requests``.
   A request whose prompt is fully read in a step gets its first token at the step's end;
   decoding requests get one token each.

Aborts (the client went away) take effect at the next step: the request leaves the batch or
the queue and its KV blocks are free for that step's admissions.

What is not modelled: prefix caching (a resumed or repeated prompt costs its full prefill),
speculative decoding, CUDA-graph batch-size buckets, the detokenizer and API server CPU,
structured-output grammar cost (a label answer is just two tokens), and any variance of
step time: the same batch always costs the same.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

Policy = Literal["priority", "fcfs"]

#: Filler text of one generated token. A continuation counts its earlier tokens by it.
TOKEN = "tok "


@dataclass(frozen=True, slots=True)
class Costs:
    """One engine's speed and limits, e.g. ``Costs(base_s=0.0076, per_seq_s=9e-5, ...)``."""

    base_s: float  # a step with one decoding request: weights read once
    per_seq_s: float  # each request in the batch (sampling, KV writes, bookkeeping)
    per_prefill_token_s: float  # each prompt token read (compute-bound)
    per_context_token_s: float  # each context token a decoding request attends to
    max_num_seqs: int  # vLLM --max-num-seqs
    max_batched_tokens: int  # vLLM --max-num-batched-tokens (token budget of a step)
    kv_tokens: int  # KV-cache capacity in tokens
    block_size: int = 16
    max_model_len: int = 32768

    def scaled(self, speed: float) -> Costs:
        """The same engine ``speed`` times as fast (every time divided by it)."""
        return replace(
            self,
            base_s=self.base_s / speed,
            per_seq_s=self.per_seq_s / speed,
            per_prefill_token_s=self.per_prefill_token_s / speed,
            per_context_token_s=self.per_context_token_s / speed,
        )


#: Named calibrations. Sources and the arithmetic are in loadtest/README-sim.md.
PRESETS: dict[str, Costs] = {
    # This machine's CPU vLLM (0.32, 2 cores shared) with Qwen2.5-Coder-0.5B-Instruct,
    # --max-num-seqs 8, fitted to the committed SLO runs (loadtest/sim_calibrate.py).
    "cpu": Costs(
        base_s=0.075,
        per_seq_s=0.0,
        per_prefill_token_s=0.004,
        per_context_token_s=0.0,
        max_num_seqs=8,
        max_batched_tokens=2048,
        kv_tokens=87_000,
    ),
    # Qwen2.5-7B-Instruct, bf16, one H100 SXM 80 GB (see README-sim.md for the numbers):
    # batch-1 decode 7.6 ms/token (Qwen's speed benchmark: Qwen2-7B-Instruct, same
    # architecture, 80.45 tokens/s on an A100 80GB with vLLM, scaled by HBM bandwidth
    # 3.35/2.04 TB/s); prefill ~33k tokens/s (14 GFLOP per token at ~50% of 989 TFLOP/s);
    # 56 KiB of KV per token (28 layers x 4 KV heads x 128 x 2 x bf16) over 3.35 TB/s;
    # KV cache 0.9 x 80 GB - 15.2 GB weights - ~4 GB activations = ~920k tokens.
    "h100-7b": Costs(
        base_s=0.0076,
        per_seq_s=0.00009,
        per_prefill_token_s=0.00003,
        per_context_token_s=1.7e-8,
        max_num_seqs=256,
        max_batched_tokens=8192,
        kv_tokens=920_000,
    ),
}


@dataclass(eq=False, slots=True)
class Seq:
    """One request inside the engine. ``target`` is how many tokens it will generate."""

    id: int
    priority: int
    arrival: float
    prompt_tokens: int
    target: int
    order: int = 0  # arrival order, the tie-breaker
    prefill_goal: int = 0  # tokens to read before the next token comes (prompt, or more
    computed: int = 0  # after a preemption); and read so far
    generated: int = 0
    blocks: int = 0
    aborted: bool = False
    finished: bool = False
    preemptions: int = 0

    @property
    def in_prefill(self) -> bool:
        return self.computed < self.prefill_goal


@dataclass(frozen=True, slots=True)
class Emitted:
    """What one request got from a step: its total tokens so far, and whether it is done."""

    seq: Seq
    generated: int
    finished: bool


@dataclass(frozen=True, slots=True)
class StepResult:
    duration: float
    emitted: list[Emitted]
    batch: int  # requests in the batch
    prefill_tokens: int
    decode_tokens: int


@dataclass(slots=True)
class Counters:
    """Cumulative numbers for /metrics (vLLM's names are attached by the server)."""

    steps: int = 0
    busy_s: float = 0.0
    itl_sum_s: float = 0.0  # inter-token latency histogram's sum and count
    itl_count: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    finished: int = 0
    aborted: int = 0


class Engine:
    """The scheduler and cost model of one simulated vLLM engine (not thread-safe)."""

    def __init__(self, costs: Costs, policy: Policy = "priority") -> None:
        self.costs = costs
        self.policy = policy
        self.running: list[Seq] = []
        self._waiting: list[tuple[int, int, Seq]] = []  # heap of (priority, order, seq)
        self._waiting_live = 0
        self._order = itertools.count()
        self._total_blocks = costs.kv_tokens // costs.block_size
        self._used_blocks = 0
        self.counters = Counters()

    # -- state ----------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return self._waiting_live

    @property
    def num_running(self) -> int:
        return sum(1 for s in self.running if not s.aborted)

    @property
    def kv_usage(self) -> float:
        return self._used_blocks / self._total_blocks if self._total_blocks else 0.0

    def idle(self) -> bool:
        return not self.running and self._waiting_live == 0

    def waiting(self) -> list[Seq]:
        """The waiting requests in the order they would be admitted (for tests)."""
        return [s for _, _, s in sorted(self._waiting, key=lambda e: e[:2]) if not s.aborted]

    # -- requests -----------------------------------------------------------------------

    def add(self, seq: Seq) -> Seq:
        seq.order = next(self._order)
        seq.prefill_goal = seq.prompt_tokens
        seq.target = max(seq.target, 1)
        self._push(seq)
        return seq

    def abort(self, seq: Seq) -> None:
        """The client went away: the request leaves at the next step."""
        if seq.aborted or seq.finished:
            return
        seq.aborted = True
        if seq not in self.running:  # waiting: it no longer counts
            self._waiting_live -= 1
        self.counters.aborted += 1

    def _push(self, seq: Seq) -> None:
        key = seq.priority if self.policy == "priority" else 0
        heapq.heappush(self._waiting, (key, seq.order, seq))
        self._waiting_live += 1

    # -- one step -------------------------------------------------------------------------

    def step(self) -> StepResult:
        """Schedule one batch, account for it, and say how long it takes and what it yields."""
        c = self.costs
        self._drop_aborted()
        budget = c.max_batched_tokens
        batch: list[tuple[Seq, int]] = []  # (seq, tokens scheduled)
        preempted: set[int] = set()
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.id in preempted:
                continue
            n = min(seq.prefill_goal - seq.computed, budget) if seq.in_prefill else 1
            while not self._grow(seq, n):
                victim = self._victim()
                self._preempt(victim)
                preempted.add(victim.id)
                for i, (scheduled, tokens) in enumerate(batch):
                    if scheduled is victim:  # it gives back its place in this step
                        del batch[i]
                        budget += tokens
                        break
                if victim is seq:
                    break
            if seq.id in preempted:
                continue
            batch.append((seq, n))
            budget -= n
        if not preempted:  # vLLM admits nothing in a step that had to preempt
            self._admit(batch, budget)
        return self._finish(batch)

    def _admit(self, batch: list[tuple[Seq, int]], budget: int) -> None:
        c = self.costs
        while self._waiting and budget > 0 and len(self.running) < c.max_num_seqs:
            _, _, seq = self._waiting[0]
            if seq.aborted:
                heapq.heappop(self._waiting)
                continue
            need = self._blocks_for(seq.prefill_goal + 1)
            if self._used_blocks + need > self._total_blocks:
                break  # the head does not fit: nothing behind it goes either
            heapq.heappop(self._waiting)
            self._waiting_live -= 1
            self.running.append(seq)
            n = min(seq.prefill_goal - seq.computed, budget)
            self._grow(seq, n)
            batch.append((seq, n))
            budget -= n

    def _finish(self, batch: list[tuple[Seq, int]]) -> StepResult:
        c = self.costs
        prefill = decode = context = 0
        emitted: list[Emitted] = []
        for seq, n in batch:
            if seq.in_prefill:
                prefill += n
                seq.computed += n
                if seq.in_prefill:
                    continue  # more of its prompt next step
            else:
                decode += 1
                context += seq.computed
                seq.computed += 1
            seq.generated += 1
            emitted.append(Emitted(seq, seq.generated, seq.generated >= seq.target))
        duration = (
            c.base_s
            + c.per_seq_s * len(batch)
            + c.per_prefill_token_s * prefill
            + c.per_context_token_s * context
        )
        if not batch:
            duration = 0.0
        for e in emitted:
            if e.finished:
                e.seq.finished = True
                self._release(e.seq)
                self.counters.finished += 1
        if any(e.finished for e in emitted):
            self.running = [s for s in self.running if not s.finished]
        k = self.counters
        k.steps += 1 if batch else 0
        k.busy_s += duration
        k.itl_sum_s += duration * decode
        k.itl_count += decode
        k.prompt_tokens += prefill
        k.generation_tokens += len(emitted)
        return StepResult(duration, emitted, len(batch), prefill, decode)

    # -- KV cache -------------------------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.costs.block_size)

    def _grow(self, seq: Seq, n: int) -> bool:
        """Make room for ``n`` more tokens of ``seq``; False if the cache is full."""
        need = self._blocks_for(seq.computed + n) - seq.blocks
        if need <= 0:
            return True
        if self._used_blocks + need > self._total_blocks:
            return False
        seq.blocks += need
        self._used_blocks += need
        return True

    def _release(self, seq: Seq) -> None:
        self._used_blocks -= seq.blocks
        seq.blocks = 0

    def _victim(self) -> Seq:
        live = [s for s in self.running if not s.aborted]
        if self.policy == "priority":
            return max(live, key=lambda s: (s.priority, s.order))
        return live[-1]

    def _preempt(self, seq: Seq) -> None:
        """Evict ``seq`` from the batch; it recomputes prompt + generated when readmitted."""
        self.running.remove(seq)
        self._release(seq)
        seq.prefill_goal = seq.prompt_tokens + seq.generated
        seq.computed = 0
        seq.preemptions += 1
        self.counters.preemptions += 1
        self._push(seq)

    def _drop_aborted(self) -> None:
        if any(s.aborted for s in self.running):
            for seq in self.running:
                if seq.aborted:
                    self._release(seq)
            self.running = [s for s in self.running if not s.aborted]


# -- what a request asks for ---------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """Qwen-tokenizer-sized count without a tokenizer: ~4 ASCII characters per token, one
    per other character (a CJK character is usually one token)."""
    ascii_chars = sum(1 for ch in text if ord(ch) < 128)
    return max(ascii_chars // 4 + (len(text) - ascii_chars), 1 if text else 0)


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """Prompt length of a chat or completions body, with ChatML's few tokens per message."""
    messages = body.get("messages")
    if isinstance(messages, list):
        total = 3  # the assistant turn's header
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            total += 4 + estimate_tokens(content if isinstance(content, str) else "")
        return total
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return max(len(prompt), 1)
    return max(estimate_tokens(str(prompt or "")), 1)


def continued_tokens(body: Mapping[str, Any]) -> int:
    """Tokens a continuation already has: the filler tokens of a final assistant message
    (chat, ``continue_final_message``) or at the end of the prompt (completions)."""
    messages = body.get("messages")
    if isinstance(messages, list) and body.get("continue_final_message"):
        last = messages[-1] if messages else None
        if isinstance(last, dict) and last.get("role") == "assistant":
            return str(last.get("content") or "").count(TOKEN)
        return 0
    prompt = body.get("prompt")
    count = 0
    if isinstance(prompt, str):
        while prompt.endswith(TOKEN):
            prompt, count = prompt[: -len(TOKEN)], count + 1
    return count


#: How long answers are, as fractions of max_tokens, by the task's system prompt (its
#: first words): quantiles (0, 0.1, ..., 1) of what the real default model generated in the
#: committed CPU SLO runs (loadtest/results/slo-requests.csv and slo-v6/). A request with
#: another system prompt generates max_tokens.
# fmt: off
LENGTHS: dict[str, tuple[float, ...]] = {
    "You are a helpful assistant. Answer": (
        0.11, 0.44, 0.66, 0.88, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
    ),
    "Summarize the user's text": (
        0.48, 0.51, 0.64, 0.66, 0.66, 0.77, 0.80, 0.81, 0.81, 0.88, 1.0,
    ),
    "You are a helpful assistant.": (
        0.06, 0.60, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
    ),
}
# fmt: on
LABEL_TOKENS = 2  # the label and the end of text, as vLLM counts a constrained answer


def unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts (the same request, the same draw)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def answer_length(body: Mapping[str, Any], max_tokens: int) -> int:
    """Tokens the request generates: a label task's label, or its task's length
    distribution (deterministic in the seed and the user's text), within ``max_tokens``."""
    if _choices(body):
        return min(LABEL_TOKENS, max_tokens)
    system = _system_prompt(body)
    quantiles = next((q for prefix, q in LENGTHS.items() if system.startswith(prefix)), None)
    if quantiles is None:
        return max_tokens
    u = unit_hash(body.get("seed"), _last_user_text(body)) * (len(quantiles) - 1)
    i = int(u)
    fraction = quantiles[i] + (quantiles[min(i + 1, len(quantiles) - 1)] - quantiles[i]) * (u - i)
    natural = max(round(fraction * _original_max_tokens(body, max_tokens)), 1)
    return max(min(natural - continued_tokens(body), max_tokens), 1)


def label_for(body: Mapping[str, Any]) -> str | None:
    choices = _choices(body)
    if not choices:
        return None
    return str(choices[int(unit_hash(_last_user_text(body)) * len(choices))])


def _choices(body: Mapping[str, Any]) -> Sequence[Any]:
    structured = body.get("structured_outputs")
    if isinstance(structured, dict) and isinstance(structured.get("choice"), list):
        return structured["choice"]  # type: ignore[no-any-return]
    return ()


def _system_prompt(body: Mapping[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        if messages[0].get("role") == "system":
            return str(messages[0].get("content") or "")
        return ""
    return str(body.get("prompt") or "")


def _last_user_text(body: Mapping[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                return str(m.get("content") or "")
        return ""
    return str(body.get("prompt") or "")


def _original_max_tokens(body: Mapping[str, Any], max_tokens: int) -> int:
    """A continuation asks for what is left; its answer's length counts from the whole."""
    return max_tokens + continued_tokens(body)


@dataclass(slots=True)
class Tracked:
    """A request of a virtual-time replay: when it arrived, its first token, its end."""

    arrival: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0
    seq: Seq | None = None


def replay(
    engine: Engine,
    arrivals: Sequence[tuple[float, Seq]],
    until: float = math.inf,
    on_step: Callable[[float, StepResult], None] | None = None,
) -> dict[int, Tracked]:
    """Run ``arrivals`` (time, request) through ``engine`` in virtual time, as fast as the
    CPU goes: the same model the server runs, with no HTTP and no clock. Requests still
    running at ``until`` are aborted (the benchmark's cutoff). Returns per request id."""
    tracked = {seq.id: Tracked(at, seq=seq) for at, seq in arrivals}
    pending = sorted(arrivals, key=lambda a: a[0])
    i, now = 0, 0.0
    while i < len(pending) or not engine.idle():
        while i < len(pending) and pending[i][0] <= now:
            engine.add(pending[i][1])
            i += 1
        if engine.idle():
            now = pending[i][0]
            continue
        if now >= until:
            for t in tracked.values():
                if t.seq is not None and t.end is None:
                    engine.abort(t.seq)
            engine.step()
            break
        result = engine.step()
        now += result.duration if result.duration > 0 else 1e-6
        for e in result.emitted:
            t = tracked[e.seq.id]
            t.tokens = e.generated
            if t.first is None:
                t.first = now
            if e.finished:
                t.end = now
        if on_step is not None:
            on_step(now, result)
    return tracked
