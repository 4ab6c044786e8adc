"""What a user of the default stack gets: correct labels, answers in their language, assist."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai

LABELLED = [
    ("This restaurant was wonderful, the food was delicious and the staff were kind.", "positive"),
    ("I absolutely love my new phone, it works perfectly.", "positive"),
    ("What a fantastic, delightful experience.", "positive"),
    ("The movie was brilliant and I enjoyed every minute.", "positive"),
    ("Great service, fast delivery, I am very happy with it.", "positive"),
    ("Thank you so much, this made my day!", "positive"),
    ("The product broke after one day, total waste of money.", "negative"),
    ("This is the worst hotel I have ever stayed in.", "negative"),
    ("I am very disappointed and angry with the support team.", "negative"),
    ("The food was cold and tasted terrible.", "negative"),
    ("Awful experience, I will never come back.", "negative"),
    ("My order arrived late and damaged.", "negative"),
    ("这家餐厅的菜太好吃了，服务也很热情！", "positive"),
    ("我非常喜欢这部电影，演员演得很好。", "positive"),
    ("今天收到礼物，特别开心！", "positive"),
    ("这个手机质量很好，用起来很流畅。", "positive"),
    ("老师讲得非常清楚，我学到了很多。", "positive"),
    ("产品质量太差了，用了一天就坏了。", "negative"),
    ("服务态度非常恶劣，我再也不会来了。", "negative"),
    ("这部电影太无聊了，浪费时间。", "negative"),
    ("快递太慢了，包裹还破了。", "negative"),
    ("我对这次购物非常失望。", "negative"),
    ("房间又脏又吵，体验很糟糕。", "negative"),
    ("客服一直不回复，让人很生气。", "negative"),
]
CJK = re.compile(r"[\u4e00-\u9fff]")


async def test_sentiment_accuracy_on_labelled_zh_en_sentences(gateway: str) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{gateway}/v1", api_key="unused", max_retries=0
    ) as client:
        # An accuracy check, not a flood: a burst of 24 would (rightly) meet sentiment's
        # 2 s queue deadline on two shared cores.
        limit = asyncio.Semaphore(4)

        async def label(text: str) -> str | None:
            async with limit:
                reply = await client.chat.completions.create(
                    model="sentiment", messages=[{"role": "user", "content": text}]
                )
            return reply.choices[0].message.content

        answers = await asyncio.gather(*(label(text) for text, _ in LABELLED))
    correct = sum(
        answer == expected for answer, (_, expected) in zip(answers, LABELLED, strict=True)
    )
    wrong = [(t, a) for a, (t, e) in zip(answers, LABELLED, strict=True) if a != e]
    print(f"\nsentiment accuracy: {correct}/{len(LABELLED)}; wrong: {wrong}")
    assert set(answers) <= {"positive", "negative"}
    assert correct / len(LABELLED) >= 0.9, wrong


async def test_chat_answers_in_chinese_and_english(gateway: str) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{gateway}/v1", api_key="unused", max_retries=0
    ) as client:
        zh = await client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "你好，请用一句话介绍一下你自己。"}],
            max_tokens=60,
        )
        en = await client.chat.completions.create(
            model="chat",
            messages=[
                {
                    "role": "user",
                    "content": "Hello! In one sentence, what is the capital of France?",
                }
            ],
            max_tokens=60,
        )
    zh_text, en_text = zh.choices[0].message.content or "", en.choices[0].message.content or ""
    print(f"\nzh: {zh_text!r}\nen: {en_text!r}")
    assert len(CJK.findall(zh_text)) >= 5
    assert not CJK.search(en_text)
    assert "Paris" in en_text


async def test_assist_returns_a_label_and_a_fitting_reply(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway, timeout=120) as c:
        r = await c.post(
            "/v1/chat/completions",
            json={
                "model": "assist",
                "messages": [
                    {
                        "role": "user",
                        "content": "My package arrived broken and nobody answers my emails.",
                    }
                ],
                "max_tokens": 60,
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        print(f"\nassist: {body['sentiment']} / {body['choices'][0]['message']['content']!r}")
        assert body["sentiment"] == "negative"
        assert r.headers["x-sentiment"] == "negative"
        assert body["choices"][0]["message"]["content"]

        stream = await c.post(
            "/v1/chat/completions",
            json={
                "model": "assist",
                "stream": True,
                "messages": [{"role": "user", "content": "今天天气真好，心情特别棒！"}],
                "max_tokens": 40,
            },
        )
        lines = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        first = json.loads(lines[0])
        assert first["sentiment"] == "positive"
        assert stream.headers["x-sentiment"] == "positive"
        text = "".join(
            json.loads(x)["choices"][0]["delta"].get("content") or ""
            for x in lines[:-1]
            if json.loads(x)["choices"]
        )
        assert text


async def test_readme_sdk_example(gateway: str) -> None:
    """The example in the README, as a user would run it (sync client)."""

    def example() -> tuple[str | None, str | None, str]:
        from openai import OpenAI

        client = OpenAI(base_url=f"{gateway}/v1", api_key="unused")
        label = client.chat.completions.create(
            model="sentiment", messages=[{"role": "user", "content": "这家餐厅太好吃了"}]
        )
        answer = client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "Say hi in five words."}],
            max_tokens=20,
        )
        streamed = ""
        for chunk in client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "Count to five."}],
            max_tokens=30,
            stream=True,
        ):
            streamed += chunk.choices[0].delta.content or "" if chunk.choices else ""
        client.close()
        return label.choices[0].message.content, answer.choices[0].message.content, streamed

    label, answer, streamed = await asyncio.to_thread(example)
    assert label == "positive"
    assert answer
    assert streamed
