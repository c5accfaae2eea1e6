"""From an OpenAI request body to an engine request, and from the engine's events back to OpenAI
responses: one JSON body, or server-sent events (one `data:` line per chunk, then `data: [DONE]`)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from bitnet158.generation.sampling import SamplingParams
from bitnet158.serve.engine_process import EngineProcess, EngineStopped, QueueFull, RequestHandle
from bitnet158.serve.errors import APIError
from bitnet158.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    SamplingFields,
    TopLogprob,
    Usage,
)
from bitnet158.serve.request import Delta, Failed, Finished, TokenLogprob
from bitnet158.tokenizer import Tokenizer

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 0.5
MIN_TEMPERATURE = 1e-5


class EngineStream(StreamingResponse):
    """Server-sent events that cancel their engine request when the response ends, whatever ends it: the
    client can leave before the first chunk, when the event generator has not started (and so cannot
    clean up). Cancelling a finished request does nothing."""

    def __init__(self, events: AsyncIterator[str], cancel: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.cancel = cancel

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancel()


class Generator:
    """Serves the two generation endpoints for one model."""

    def __init__(self, engine: EngineProcess, tokenizer: Tokenizer, model_name: str, context: int) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context = context
        # No token is longer than this, so a text of more than context * this many bytes cannot fit the
        # context: such prompts are refused before tokenizing them (which costs time on huge inputs).
        self.max_token_bytes = max(len(t.encode()) for t in tokenizer.tokenizer.get_vocab())

    async def completion(self, body: CompletionRequest, http: HTTPRequest):
        request = self._request(body, body.prompt, body.logprobs)
        if body.stream:
            return self._stream(request, body, self._completion_chunk, first=None)
        text, logprobs, finished = await self._collect(request, http)
        choice = CompletionChoice(text=text, finish_reason=finished.reason,
                                  logprobs=self._completion_logprobs(logprobs, len(body.prompt)) if
                                  body.logprobs is not None else None)
        return CompletionResponse(id=f"cmpl-{request.id}", created=int(time.time()), model=self.model_name,
                                  choices=[choice], usage=_usage(finished))

    async def chat(self, body: ChatCompletionRequest, http: HTTPRequest):
        prompt = self.tokenizer.apply_chat_template([m.model_dump() for m in body.messages])
        top = (body.top_logprobs or 0) if body.logprobs else None
        request = self._request(body, prompt, top)
        if body.stream:
            first = ChatCompletionChunk(id=f"chatcmpl-{request.id}", created=int(time.time()), model=self.model_name,
                                        choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])
            return self._stream(request, body, self._chat_chunk, first)
        text, logprobs, finished = await self._collect(request, http)
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finished.reason,
                            logprobs=self._chat_logprobs(logprobs) if body.logprobs else None)
        return ChatCompletionResponse(id=f"chatcmpl-{request.id}", created=int(time.time()), model=self.model_name,
                                      choices=[choice], usage=_usage(finished))

    def _request(self, body: SamplingFields, prompt: str, top_logprobs: int | None) -> RequestHandle:
        """Check the model and the lengths, tokenize, and queue the request (429 if the queue is full)."""
        if body.model != self.model_name:
            raise APIError(404, f"The model '{body.model}' does not exist; this server has '{self.model_name}'.",
                           "invalid_request_error", "model_not_found", "model")
        if len(prompt.encode()) > self.context * self.max_token_bytes:
            raise self._too_long(f"more than {self.context}", body.max_tokens)
        prompt_ids = self.tokenizer.encode(prompt)
        room = self.context - len(prompt_ids)
        default = COMPLETIONS_DEFAULT_MAX_TOKENS if isinstance(body, CompletionRequest) else room
        max_tokens = body.max_tokens or min(default, room)
        if room < 1 or max_tokens > room:
            raise self._too_long(str(len(prompt_ids)), max_tokens)
        # Below this, logits / temperature overflows to inf; the distribution is a point mass anyway.
        temperature = 0.0 if body.temperature < MIN_TEMPERATURE else body.temperature
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=body.top_p,
                                seed=body.seed, stop=body.stop_list())
        try:
            return self.engine.submit(prompt_ids, params, top_logprobs)
        except QueueFull:
            raise APIError(429, "The server is busy: too many requests are waiting. Retry later.",
                           "rate_limit_error", "queue_full") from None
        except EngineStopped:
            raise APIError(503, "The model's engine has stopped.", "server_error", "engine_stopped") from None

    def _too_long(self, prompt_tokens: str, max_tokens: int | None) -> APIError:
        asked = "" if max_tokens is None else f" plus max_tokens {max_tokens}"
        return APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                        f"{prompt_tokens} tokens{asked}. Shorten the prompt or lower max_tokens.",
                        "invalid_request_error", "context_length_exceeded")

    async def _events(self, request: RequestHandle, http: HTTPRequest | None) -> AsyncIterator[Delta | Finished]:
        """The request's events until it finishes; if the client goes away first, cancel it. With `http`, poll it
        for a client that leaves (a streamed response notices that itself: it listens for the disconnect)."""
        done = False
        try:
            while not done:
                if http is None:
                    event = await request.events.get()
                else:
                    try:
                        event = await asyncio.wait_for(request.events.get(), DISCONNECT_POLL_S)
                    except TimeoutError:
                        if await http.is_disconnected():
                            return
                        continue
                if isinstance(event, Failed):
                    raise APIError(500, event.message, "server_error")
                done = isinstance(event, Finished)
                yield event
        finally:
            if not done:
                self.engine.cancel(request)

    async def _collect(self, request: RequestHandle, http: HTTPRequest) -> tuple[str, list[TokenLogprob], Finished]:
        text, logprobs, finished = [], [], None
        async for event in self._events(request, http):
            if isinstance(event, Finished):
                finished = event
            else:
                text.append(event.text)
                if event.logprob is not None:
                    logprobs.append(event.logprob)
        if finished is None:  # the client left; nobody reads this answer
            raise APIError(499, "The client closed the request.", "invalid_request_error")
        return "".join(text), logprobs, finished

    def _stream(self, request: RequestHandle, body: SamplingFields, make_chunk: Callable[..., BaseModel],
                first: BaseModel | None) -> StreamingResponse:
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        # A chunk of text without logprobs, nearly every chunk, is made once by pydantic around a placeholder and
        # then filled in: building and dumping the model per token cost the event loop a fifth of its time.
        placeholder = json.dumps(uuid.uuid4().hex)
        head, tail = _sse(make_chunk(request, json.loads(placeholder), [], None)).split(placeholder)

        async def sse() -> AsyncIterator[str]:
            if first is not None:
                yield _sse(first)
            pending: list[TokenLogprob] = []  # logprobs of tokens whose text is still held back
            try:
                async for event in self._events(request, None):
                    if isinstance(event, Delta):
                        if event.logprob is not None:
                            pending.append(event.logprob)
                        if event.text and not pending:
                            yield head + json.dumps(event.text) + tail
                        elif event.text:
                            yield _sse(make_chunk(request, event.text, pending, None))
                            pending = []
                    else:
                        yield _sse(make_chunk(request, "", pending, event.reason))
                        if include_usage:
                            yield _sse(make_chunk(request, None, [], None, _usage(event)))
            except APIError as err:  # the status line is sent already: report it in the stream
                yield f"data: {err.body().decode()}\n\n"
            yield "data: [DONE]\n\n"

        return EngineStream(sse(), lambda: self.engine.cancel(request))

    def _completion_chunk(self, request: RequestHandle, text: str | None, logprobs: list[TokenLogprob],
                          reason: str | None, usage: Usage | None = None) -> CompletionResponse:
        choices = [] if text is None else [CompletionChoice(
            text=text, finish_reason=reason,
            logprobs=self._completion_logprobs(logprobs, 0) if request.top_logprobs is not None else None)]
        return CompletionResponse(id=f"cmpl-{request.id}", created=int(time.time()), model=self.model_name,
                                  choices=choices, usage=usage)

    def _chat_chunk(self, request: RequestHandle, text: str | None, logprobs: list[TokenLogprob],
                    reason: str | None, usage: Usage | None = None) -> ChatCompletionChunk:
        choices = [] if text is None else [ChatChunkChoice(
            delta=ChatDelta(content=text or None), finish_reason=reason,
            logprobs=self._chat_logprobs(logprobs) if request.top_logprobs is not None else None)]
        return ChatCompletionChunk(id=f"chatcmpl-{request.id}", created=int(time.time()),
                                   model=self.model_name, choices=choices, usage=usage)

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _completion_logprobs(self, logprobs: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for entry in logprobs:
            token = self._token(entry.token_id)
            result.tokens.append(token)
            result.token_logprobs.append(entry.logprob)
            result.top_logprobs.append({self._token(t): lp for t, lp in entry.top})
            result.text_offset.append(offset)
            offset += len(token)
        return result

    def _chat_logprobs(self, logprobs: list[TokenLogprob]) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            token = self._token(token_id)
            return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

        return ChatLogprobs(content=[
            ChatTokenLogprob(**top(e.token_id, e.logprob).model_dump(), top_logprobs=[top(t, lp) for t, lp in e.top])
            for e in logprobs
        ])


def _usage(finished: Finished) -> Usage:
    return Usage(prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens,
                 total_tokens=finished.prompt_tokens + finished.completion_tokens)


def _sse(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"
