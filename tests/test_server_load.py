"""64 concurrent streaming clients against the tiny model, with random disconnects and bad requests
mixed in: every good request gets exactly its solo greedy answer, no block leaks, health stays
green."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp

from tests.test_server import get, post, wait_pool_idle

PROMPTS = [f"agent {i} asks about topic {i * 7}: " + "context " * (i % 4 * 5) for i in range(8)]
MAX_TOKENS = 16
CLIENTS = 64


def body(prompt: str, stream: bool) -> dict:
    return {
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


async def good(session: aiohttp.ClientSession, url: str, prompt: str) -> str:
    text = []
    async with session.post(url, json=body(prompt, True)) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = raw.decode().strip()
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text.append(chunk["choices"][0]["text"])
    return "".join(text)


async def disconnect(session: aiohttp.ClientSession, url: str, prompt: str, after: int) -> None:
    async with session.post(url, json=body(prompt, True)) as r:
        assert r.status == 200
        seen = 0
        async for _ in r.content:
            seen += 1
            if seen >= after:
                break
        r.close()  # drop the connection mid-stream


async def bad(session: aiohttp.ClientSession, url: str, rng: random.Random) -> None:
    payload = rng.choice([
        {"prompt": "x", "max_tokens": -1},
        {"prompt": "x", "n": 17},  # n is 1..16
        {"prompt": "x", "stream": True, "bogus_field": 1},
        {"prompt": 42},
        {"prompt": "x" * 400},
    ])  # fmt: skip
    async with session.post(url, json=payload) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"]


def test_concurrent_streams_with_disconnects_and_bad_requests(served):
    server, engine = served
    url = server.url + "/v1/completions"
    solo = {p: post(url, json=body(p, False)).json()["choices"][0]["text"] for p in PROMPTS}
    assert len(set(solo.values())) >= 4  # the tiny model's answers depend on the prompt
    rng = random.Random(0)
    plan = [rng.choice(["good", "good", "good", "disconnect", "bad"]) for _ in range(CLIENTS)]

    async def main() -> list[tuple[str, str, str | None]]:
        conn = aiohttp.TCPConnector(limit=CLIENTS)
        async with aiohttp.ClientSession(
            connector=conn, timeout=aiohttp.ClientTimeout(total=120)
        ) as session:

            async def one(i: int, kind: str) -> tuple[str, str, str | None]:
                prompt = PROMPTS[i % len(PROMPTS)]
                await asyncio.sleep(rng.random() * 0.2)
                if kind == "good":
                    return kind, prompt, await good(session, url, prompt)
                if kind == "disconnect":
                    await disconnect(session, url, prompt, after=1 + i % 5)
                else:
                    await bad(session, url, rng)
                return kind, prompt, None

            return await asyncio.wait_for(
                asyncio.gather(*(one(i, k) for i, k in enumerate(plan))), 180
            )

    results = asyncio.run(main())
    goods = [(p, t) for k, p, t in results if k == "good"]
    assert len(goods) >= CLIENTS // 2
    for prompt, text in goods:
        assert text == solo[prompt]
    wait_pool_idle(server, engine)
    assert get(server.url + "/health").json() == {"status": "ok"}
    metrics = get(server.url + "/metrics").text
    assert 'tokencake_http_requests_total{route="/v1/completions",status="400"}' in metrics
