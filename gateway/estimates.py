"""What the gateway has seen of each task: how long until its first token, how fast it
decodes, how long its answers are. Feeds deadlines (is it still worth sending?) and early
refusal (can it still make its deadline?).
"""

from __future__ import annotations


class Ewma:
    """Exponentially weighted averages by key, e.g. each task's time to first token."""

    def __init__(self, alpha: float = 0.2) -> None:
        self._alpha = alpha
        self._values: dict[str, float] = {}

    def observe(self, key: str, value: float) -> None:
        old = self._values.get(key)
        self._values[key] = value if old is None else old + self._alpha * (value - old)

    def get(self, key: str, default: float = 0.0) -> float:
        return self._values.get(key, default)


class Estimates:
    """Per-task exponentially weighted averages, updated as steps run."""

    def __init__(self) -> None:
        self.ttft = Ewma()  # dispatch to first event, seconds
        self.tpot = Ewma()  # seconds per output token after the first
        self.tokens = Ewma()  # output tokens per answer

    def finished(self, task: str, decode_s: float, tokens: int) -> None:
        """A step's answer is complete: ``tokens`` generated in ``decode_s`` after the first."""
        if tokens > 1:
            self.tpot.observe(task, decode_s / (tokens - 1))
        if tokens > 0:
            self.tokens.observe(task, float(tokens))

    def service_s(self, task: str, max_tokens: int) -> float:
        """Seconds a step of the task will probably take once dispatched (0 until seen)."""
        tokens = min(self.tokens.get(task, float(max_tokens)), float(max_tokens))
        return self.ttft.get(task) + max(tokens - 1, 0.0) * self.tpot.get(task)
