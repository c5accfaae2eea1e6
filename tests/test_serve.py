"""The HTTP server: the official openai client against a uvicorn server on a free port, continuous
batching (concurrent greedy requests give a lone request's text), errors, auth, limits and metrics."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn

from bitnet158.cli.model_loading import load_model
from bitnet158.errors import UserError
from bitnet158.generation import SamplingParams, generate
from bitnet158.serve import ModelSource, create_app

MODEL = "embedded"
CPU_MODEL = ModelSource(None, "cpu")  # the embedded model, loaded by the server's engine process
KEY = "test-key-123"


@contextmanager
def running_server(app) -> Iterator[str]:
    """Run `app` with uvicorn on a free port of 127.0.0.1 in this process; yield its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def embedded():
    return load_model(None, torch.device("cpu"))


@pytest.fixture(scope="module")
def url(embedded) -> Iterator[str]:
    with running_server(create_app(CPU_MODEL, MODEL, max_batch=32)) as base:
        yield base


@pytest.fixture
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_completion_is_the_greedy_continuation(client, embedded):
    model, tokenizer = embedded
    prompt = "import os\n"
    expected = generate(model, tokenizer, [prompt], SamplingParams(max_new_tokens=12, temperature=0))[0]
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert result.choices[0].text == expected
    assert result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert result.usage.completion_tokens == 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + 12


def test_streamed_completion_equals_the_whole(client):
    kwargs = dict(model=MODEL, prompt="class Stack:\n", max_tokens=12, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 2  # really streamed, piece by piece
    assert "".join(c.choices[0].text for c in text_chunks) == whole
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_streaming_and_not(client, embedded):
    _, tokenizer = embedded
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(tokenizer.encode(tokenizer.apply_chat_template(messages)))
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_string_ends_the_text(client):
    full = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=12, temperature=0).choices[0]
    stop = full.text.split("\n")[0][-3:]  # the end of the first line
    result = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=12, temperature=0, stop=[stop])
    assert result.choices[0].text == full.text[: full.text.index(stop)]
    assert result.choices[0].finish_reason == "stop"


def test_logprobs(client):
    result = client.completions.create(model=MODEL, prompt="def ", max_tokens=6, temperature=0, logprobs=3)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == 6 and "".join(logprobs.tokens) == result.choices[0].text
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 3 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob)  # greedy picks the most likely token
        assert top[token] == pytest.approx(logprob)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(entry.top_logprobs) == 2 for entry in content)


def test_a_tiny_temperature_is_greedy(client):
    kwargs = dict(model=MODEL, prompt="import", max_tokens=4)
    greedy = client.completions.create(**kwargs, temperature=0).choices[0].text
    assert client.completions.create(**kwargs, temperature=1e-300).choices[0].text == greedy


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=MODEL, prompt="import", max_tokens=12, temperature=1.0, top_p=0.9)
    texts = [client.completions.create(**kwargs, seed=seed).choices[0].text for seed in (7, 7, 8)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_concurrent_streams_get_the_lone_greedy_text(url):
    """32 streaming clients, arriving while others are mid-generation, each get exactly the text that the
    same request gets alone: a request's output does not depend on what else is in the batch."""
    prompts = ["import os\n", "class Stack:\n", "def main():\n", "from typing import", "x = [", "# Copyright",
               "    return", "if __name__"]
    lone_client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    lone = [lone_client.completions.create(model=MODEL, prompt=p, max_tokens=48, temperature=0).choices[0].text
            for p in prompts]

    async def one(client: openai.AsyncOpenAI, index: int) -> tuple[str, float, float]:
        """The text, and when its first and last chunks came."""
        await asyncio.sleep(0.003 * index)  # staggered: most join a batch that is already decoding
        stream = await client.completions.create(model=MODEL, prompt=prompts[index % len(prompts)], max_tokens=48,
                                                 temperature=0, stream=True)
        pieces, times = [], []
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
                times.append(time.monotonic())
        return "".join(pieces), times[0], times[-1]

    async def all_clients() -> list[tuple[str, float, float]]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    streams = asyncio.run(all_clients())
    assert [text for text, _, _ in streams] == [lone[i % len(prompts)] for i in range(32)]
    # They really ran together: at some moment at least 16 streams were between their first and last chunks.
    assert max(sum(first <= start <= last for _, first, last in streams) for _, start, _ in streams) >= 16


def _post(url: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{url}/v1/completions", content=content, headers={"Content-Type": "application/json"},
                      timeout=60, **kwargs)


MALFORMED = [
    b"{not json",
    b"",
    b"[]",
    {"model": MODEL},
    {"model": MODEL, "prompt": 42},
    {"model": MODEL, "prompt": ""},
    {"model": MODEL, "prompt": "x", "max_tokens": -1},
    {"model": MODEL, "prompt": "x", "max_tokens": "ten"},
    {"model": MODEL, "prompt": "x", "max_tokens": "3"},
    {"model": MODEL, "prompt": "x", "max_tokens": True},
    {"model": MODEL, "prompt": "x", "stream": "yes"},
    {"model": MODEL, "prompt": "x", "max_tokens": 10**12},
    {"model": MODEL, "prompt": "x", "temperature": -0.5},
    {"model": MODEL, "prompt": "x", "temperature": 1e309},
    {"model": MODEL, "prompt": "x", "top_p": 0},
    {"model": MODEL, "prompt": "x", "seed": -3},
    {"model": MODEL, "prompt": "x", "n": 2},
    {"model": MODEL, "prompt": "x", "logprobs": 99},
    {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
    {"model": MODEL, "prompt": "x", "stop": [""]},
    {"model": "gpt-4", "prompt": "x"},
    {"model": MODEL, "prompt": "x" * 1_000_000},
    {"model": MODEL, "prompt": "x" * 2_000_000},
]


def test_malformed_requests_get_4xx_and_the_server_stays_healthy(url):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(
                client.post("/v1/completions", content=b if isinstance(b, bytes) else json.dumps(b),
                            headers={"Content-Type": "application/json"})
                for b in MALFORMED
            ))

    responses = asyncio.run(burst())
    for body, response in zip(MALFORMED, responses, strict=True):
        assert 400 <= response.status_code < 500, (str(body)[:80], response.status_code, response.text[:200])
        error = response.json()["error"]
        assert error["message"] and error["type"]
        assert "Traceback" not in response.text
    codes = [r.status_code for r in responses]
    assert codes[MALFORMED.index({"model": "gpt-4", "prompt": "x"})] == 404
    assert codes[-1] == 413  # past the 1 MiB body limit
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert _post(url, {"model": MODEL, "prompt": "import", "max_tokens": 2}).status_code == 200


def test_prompt_longer_than_the_context_is_400(url, embedded):
    _, tokenizer = embedded
    prompt = "import os\n" * 600
    assert len(tokenizer.encode(prompt)) > 1024
    response = _post(url, {"model": MODEL, "prompt": prompt, "max_tokens": 4})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    fits_alone = _post(url, {"model": MODEL, "prompt": "import os\n" * 300, "max_tokens": 1000})
    assert fits_alone.status_code == 400  # prompt + max_tokens past the context
    assert fits_alone.json()["error"]["code"] == "context_length_exceeded"


def test_models_health_openapi(url):
    models = httpx.get(f"{url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert httpx.get(f"{url}/health").status_code == 200
    schema = httpx.get(f"{url}/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(schema["paths"])
    assert httpx.get(f"{url}/docs").status_code == 200


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_metrics_count_requests_tokens_and_errors(url):
    before = httpx.get(f"{url}/metrics").text
    assert _post(url, {"model": MODEL, "prompt": "import", "max_tokens": 5, "temperature": 0}).status_code == 200
    assert _post(url, {"model": MODEL, "prompt": 1}).status_code == 400
    after = httpx.get(f"{url}/metrics").text
    for name, added in [
        ("bitnet158_generated_tokens_total", 5),
        ('bitnet158_requests_total{code="200",path="/v1/completions"}', 1),
        ('bitnet158_request_errors_total{code="400"}', 1),
        ("bitnet158_request_latency_seconds_count", 1),
        ("bitnet158_time_to_first_token_seconds_count", 1),
    ]:
        old = _metric(before, name) if name in before else 0.0
        assert _metric(after, name) == old + added, name
    assert _metric(after, "bitnet158_running_requests") == 0
    assert _metric(after, "bitnet158_queued_requests") == 0
    assert _metric(after, "bitnet158_kv_cache_usage_ratio") == 0


def test_api_key_guards_everything_but_health(embedded):
    with running_server(create_app(CPU_MODEL, MODEL, api_key=KEY, max_batch=2)) as base:
        for path in ("/v1/models", "/metrics", "/", "/openapi.json", "/docs"):
            assert httpx.get(f"{base}{path}").status_code == 401, path
            wrong = httpx.get(f"{base}{path}", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and KEY not in wrong.text
            assert httpx.get(f"{base}{path}", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
        assert httpx.get(f"{base}/health").status_code == 200
        assert _post(base, {"model": MODEL, "prompt": "x"}).json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        assert good.completions.create(model=MODEL, prompt="import", max_tokens=2).usage.completion_tokens == 2


def test_an_engine_that_cannot_load_its_model_is_one_clear_error():
    """The engine process reports what stopped it, and the app is not made."""
    with pytest.raises(UserError, match="--device 'tpu': expected auto, cpu, cuda"):
        create_app(ModelSource(None, "tpu"), MODEL)


def test_a_dead_engine_fails_its_streams_and_the_server_says_so():
    """The engine process dies mid-stream: the stream ends with an error, new requests get 503 and /health 503."""
    app = create_app(CPU_MODEL, MODEL, max_batch=2)
    with running_server(app) as base:
        body = {"model": MODEL, "prompt": "import", "max_tokens": 1000, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(app.state.engine.pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["error"]["message"] == "the engine process exited"
        refused = _post(base, {"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_stopped"
        assert httpx.get(f"{base}/health").status_code == 503


def test_full_queue_is_429_and_a_disconnect_frees_the_slot(embedded):
    """One slot, a queue of one: a third request is refused; closing the first stream frees its slot at
    once, so the queued request runs next instead of waiting for the first to reach max_tokens."""
    with running_server(create_app(CPU_MODEL, MODEL, max_batch=1, max_queue=1)) as base:
        long = {"model": MODEL, "prompt": "import", "max_tokens": 1000, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=long, timeout=60) as first:
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # running: it holds the only slot

            async def queued() -> httpx.Response:
                async with httpx.AsyncClient(timeout=120) as client:
                    return await client.post(f"{base}/v1/completions",
                                             json={"model": MODEL, "prompt": "x", "max_tokens": 4})

            result: list[httpx.Response] = []
            second = threading.Thread(target=lambda: result.append(asyncio.run(queued())))
            second.start()
            deadline = time.monotonic() + 30
            while _metric(httpx.get(f"{base}/metrics").text, "bitnet158_queued_requests") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            refused = _post(base, {"model": MODEL, "prompt": "x", "max_tokens": 4})
            assert refused.status_code == 429
            assert refused.json()["error"]["type"] == "rate_limit_error"
            closed = time.monotonic()
            made = _metric(httpx.get(f"{base}/metrics").text, "bitnet158_generated_tokens_total")
        second.join(timeout=60)
        assert result[0].status_code == 200
        assert time.monotonic() - closed < 15
        metrics = httpx.get(f"{base}/metrics").text
        # The 1000-token request was cancelled as its client left, not run to the end: a few more of its tokens at
        # most, and the second request's 4.
        assert _metric(metrics, "bitnet158_generated_tokens_total") < min(made + 100, 1000) + 4
        assert _metric(metrics, "bitnet158_running_requests") == 0
