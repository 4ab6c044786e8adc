"""The playground (GET /playground) used in a real headless Chromium, in front of the fake vLLM.

The browser runs the page's own script: it lists the tasks from /v1/models, sends what a
visitor types, renders the streamed answer as it arrives, and shows timings, classes and
errors. Chromium missing is a failure (./launch/test.sh installs it). A screenshot goes to
test-output/playground.png (docs/playground.png is one, for the README).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from gateway.auth import hash_key
from gateway.settings import Settings
from tests.browser import Page, browser
from tests.fake_vllm import FakeVllm
from tests.servers import running_gateway

OUTPUT = Path(__file__).resolve().parents[2] / "test-output"
KEY_FIELD_SHOWN = "getComputedStyle(document.getElementById('key-row')).display !== 'none'"


async def ask(page: Page, task: str, text: str) -> str:
    """Pick ``task``, type ``text``, press Send; the answer card's selector."""
    count = await page.evaluate("document.querySelectorAll('.answer').length")
    await page.fill("#task", task)
    await page.fill("#input", text)
    await page.click("#send")
    card = f'.answer[data-answer="{count + 1}"]'
    await page.wait_for(
        f"['done', 'error'].includes(document.querySelector('{card}')?.dataset.state)"
    )
    return card


async def answer(page: Page, card: str) -> dict[str, Any]:
    """What the card shows: label, reply, class, status, timings, flags and error."""
    return dict(
        await page.evaluate(
            f"""(() => {{ const c = document.querySelector('{card}');
            const f = name => c.querySelector('[data-field="' + name + '"]');
            return {{
              state: c.dataset.state, label: f("label")?.dataset.value || null,
              reply: f("reply").textContent, klass: f("class").textContent,
              status: f("status").textContent, error: f("error")?.textContent || null,
              errorCode: c.dataset.errorCode || null, retryAfter: f("error")?.dataset.retryAfter || null,
              labelAt: Number(c.dataset.labelAt), firstTokenAt: Number(c.dataset.firstTokenAt),
              flags: [...c.querySelectorAll("[data-flag]")].map(s => s.textContent),
              timings: Object.fromEntries([...c.querySelectorAll("[data-timing]")]
                .map(s => [s.dataset.timing, [s.textContent, s.className]])),
            }}; }})()"""
        )
    )


async def test_playground_labels_streams_bursts_and_errors(fake: FakeVllm, tmp_path: Path) -> None:
    fake.behaviour.reply = "Glad you like it so much"
    fake.behaviour.chunk_delay_s = 0.05
    settings = Settings(upstreams=(fake.url,), window=1, window_mode="fixed", access_log=False)
    async with running_gateway(settings) as url, browser(tmp_path / "profile") as page:
        await page.goto(f"{url}/playground")
        await page.wait_for("document.getElementById('state').dataset.ready")
        assert await page.evaluate(KEY_FIELD_SHOWN) is False

        # A task the list no longer has (a reload removed it): the gateway's 404, with its code.
        await page.evaluate(
            """(() => { const o = document.createElement("option");
            o.value = o.textContent = "no-such-task"; document.getElementById("task").append(o); })()"""
        )
        unknown = await answer(page, await ask(page, "no-such-task", "hello"))
        assert (unknown["state"], unknown["status"]) == ("error", "404")
        assert unknown["errorCode"] == "model_not_found"
        assert unknown["error"].startswith("404 model_not_found: unknown task 'no-such-task'")

        label = await answer(page, await ask(page, "sentiment", "I love this phone"))
        assert (label["state"], label["status"], label["label"]) == ("done", "200", "positive")
        assert label["klass"] == "realtime"
        assert label["timings"]["total"][0].endswith("/ SLA 2.00 s ✓")
        assert label["timings"]["total"][1] == "ok"
        assert "queue" in label["timings"]

        long = await answer(page, await ask(page, "sentiment", "I love this phone. " * 80))
        assert (long["status"], long["label"]) == ("200", "positive")
        [flag] = long["flags"]  # 1,520 characters, one token each at the fake: over 1,024
        assert flag.startswith("input truncated: tokens=1520->"), flag
        assert label["flags"] == []

        # assist: every change of its card is recorded, to see the label come before the reply
        # and the reply arrive a piece at a time.
        await page.evaluate(
            """(() => { window.frames_ = [];
            new MutationObserver(() => {
              const c = document.querySelector(".answer");
              window.frames_.push([c.querySelector('[data-field="label"]')?.dataset.value || null,
                                   c.querySelector('[data-field="reply"]').textContent]);
            }).observe(document.getElementById("answers"),
                       {subtree: true, childList: true, characterData: true, attributes: true}); })()"""
        )
        assist = await answer(page, await ask(page, "assist", "I love this phone"))
        frames = await page.evaluate("window.frames_")
        assert (assist["state"], assist["label"], assist["klass"]) == (
            "done",
            "positive",
            "interactive",
        )
        assert assist["reply"] == "Glad you like it so much"
        replies = [reply for _, reply in frames]
        first_words = next(i for i, reply in enumerate(replies) if reply)
        assert frames[first_words][0] == "positive"  # the label was on screen before the reply
        assert assist["labelAt"] <= assist["firstTokenAt"]
        growing = list(dict.fromkeys(r for r in replies if r))
        assert len(growing) >= 4, growing  # streamed: seen growing, not appearing whole
        assert all(b.startswith(a) for a, b in itertools.pairwise(growing))
        assert assist["timings"]["ttft"][0].endswith("/ SLA 4.00 s ✓")
        assert assist["timings"]["total"][0].endswith("/ SLA 30.0 s ✓")

        # A burst through the one-slot upstream: batch first, realtime cutting in.
        mix = {"batch": 3, "sentiment": 3, "chat": 1}
        await page.evaluate(
            f"""(() => {{ const mix = {json.dumps(mix)};
            for (const i of document.querySelectorAll("#burst-mix input")) i.value = String(mix[i.dataset.task] || 0);
            document.getElementById("burst-tokens").value = "8"; }})()"""
        )
        await page.click("#burst")
        await page.wait_for("document.getElementById('burst-state').dataset.done === '7'")
        rows = await page.evaluate(
            """[...document.querySelectorAll("#burst-results tr[data-row]")].map(r =>
                [r.dataset.task, r.dataset.status, Number(r.dataset.queue), Number(r.dataset.latency)])"""
        )
        summary = await page.evaluate(
            """Object.fromEntries([...document.querySelectorAll("#burst-summary tr[data-row]")].map(r =>
                [r.dataset.row, [...r.cells].map(c => c.textContent)]))"""
        )
        OUTPUT.mkdir(exist_ok=True)
        shot = OUTPUT / "playground.png"
        await page.screenshot(shot)
        assert page.errors == []

    assert sorted(task for task, *_ in rows) == ["batch"] * 3 + ["chat"] + ["sentiment"] * 3
    assert all(status == "200" for _, status, *_ in rows)
    waits = {task: max(q for t, _, q, _ in rows if t == task) for task in mix}
    assert waits["sentiment"] < waits["batch"]  # realtime did not wait behind the batch queue
    assert list(summary) == ["class:realtime", "class:interactive", "class:batch"]
    assert summary["class:batch"][1:4] == ["3", "3", "0"]  # sent, ok, errors
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_playground_and_status_behind_a_prefix_with_keys(
    fake: FakeVllm, tmp_path: Path
) -> None:
    """Keys configured, served under /gw as a proxy would: the page asks for the key, keeps it
    out of every URL, and shows a 401 and a 429 with their codes and Retry-After."""
    key = "sk-playground-test-123"
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[tenants.demo]\nkeys = ["{hash_key(key)}"]\nrequests_per_s = 0.2\n')
    settings = Settings(
        upstreams=(fake.url,), window_mode="fixed", keys_path=keys, access_log=False
    )
    async with (
        running_gateway(settings, prefix="/gw") as url,
        browser(tmp_path / "profile") as page,
    ):
        assert url.endswith("/gw")
        await page.goto(f"{url}/playground")
        await page.wait_for("document.getElementById('state').dataset.ready")
        assert await page.evaluate(KEY_FIELD_SHOWN) is True

        missing = await answer(page, await ask(page, "sentiment", "I love this phone"))
        assert (missing["status"], missing["errorCode"]) == ("401", "missing_api_key")

        await page.fill("#key", key)
        assert await page.evaluate("sessionStorage.getItem('qwen-gateway-api-key')") == key
        ok = await answer(page, await ask(page, "sentiment", "I love this phone"))
        assert (ok["status"], ok["label"]) == ("200", "positive")

        limited = await answer(page, await ask(page, "sentiment", "I love this phone"))
        assert (limited["status"], limited["errorCode"]) == ("429", "rate_limited")
        assert int(limited["retryAfter"]) >= 1
        assert f"retry after {limited['retryAfter']} s" in limited["error"]

        urls = await page.evaluate(
            "[location.href, ...performance.getEntriesByType('resource').map(e => e.name)]"
        )
        assert all(u.startswith(f"{url}/") for u in urls), urls  # relative: under the prefix
        assert not any(key in u for u in urls)

        await page.goto(f"{url}/status")
        await page.wait_for("document.getElementById('state').textContent === 'live'")
        await page.wait_for("document.querySelector('svg[data-chart=\"queue\"]')")
        assert page.errors == []
