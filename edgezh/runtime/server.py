"""`edgezh serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the runtime engine.

Routes: `POST /v1/chat/completions` (streaming or not, `tools`), `POST /v1/completions`,
`GET /v1/models`, `GET /health`. The same `Engine` as the terminal chat renders prompts with the
template registry and streams UTF-8-safe text; tool calls are parsed by `toolcalls` (Llama 3.1
JSON for the llama3.1 format, ReAct otherwise) and returned as OpenAI `tool_calls`.

Concurrency: one generation at a time (llama.cpp holds one context) in a single worker thread;
at most `queue_size` more requests wait, and any request past that gets 429 at once. A streaming
client that disconnects cancels its generation. Errors are OpenAI-style JSON
(`{"error": {"message", "type", "param", "code"}}`) with a 4xx status for anything the client
sent wrong. `--api-key` requires `Authorization: Bearer KEY` on /v1 routes.

Extensions beyond OpenAI's fields (as llama.cpp's servers accept them): `top_k`, `min_p`,
`repeat_penalty`, `grammar` (GBNF).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgezh.errors import UserError
from edgezh.runtime.engine import ContextOverflow, Engine, Generation, SamplingParams
from edgezh.runtime.toolcalls import Prepared, interpret, openai_call, prepare


@dataclass
class ServerConfig:
    model_id: str
    api_key: str | None = None
    queue_size: int = 8
    """Requests that may wait while one generates; past that, 429."""
    defaults: SamplingParams = field(default_factory=SamplingParams)
    system: str | None = None
    """Added as the system message when a chat request has none (as Ollama does with SYSTEM)."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param, code=self.code)


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


# --- request bodies ----------------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCallIn(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class MessageIn(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionSpec(_Body):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolSpec(_Body):
    type: Literal["function"]
    function: FunctionSpec


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0, le=5)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    grammar: str | None = None


class ChatRequest(_Sampling):
    messages: list[MessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False


# --- the queue ---------------------------------------------------------------------------------------

class Scheduler:
    """One worker thread; a request is admitted while fewer than 1 + queue_size are in flight."""

    def __init__(self, queue_size: int):
        self.capacity = 1 + queue_size
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgezh-generate")
        self._lock = threading.Lock()
        self.in_flight = 0

    def admit(self) -> bool:
        with self._lock:
            if self.in_flight >= self.capacity:
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def state(self) -> dict[str, int]:
        with self._lock:
            return {"in_flight": self.in_flight, "capacity": self.capacity}


# --- the app -----------------------------------------------------------------------------------------

def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="edgezh", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    scheduler = Scheduler(config.queue_size)
    app.state.engine, app.state.config, app.state.scheduler = engine, config, scheduler
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        param = None
        for error in exc.errors():
            location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
            param = param or location or None
            problems.append(f"{location or 'body'}: {error.get('msg')}")
        return error_response(400, "; ".join(problems[:5]) or "invalid request", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type=kind)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    async def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **engine.describe(), "model": config.model_id, "file": engine.name,
                "queue": scheduler.state()}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": created,
                                            "owned_by": "edgezh"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        _check_model(body.model, config)
        params = _params(body, config, engine, body.max_completion_tokens or body.max_tokens)
        messages = _messages(body, config)
        tools = [t.model_dump() for t in body.tools] if body.tools and body.tool_choice != "none" else None
        prepared = prepare(messages, engine.format.supports_tools, tools)
        cancel = threading.Event()
        try:
            generation = engine.chat(prepared.messages, replace(params, stop=params.stop + prepared.stop),
                                     tools=prepared.tools, cancel=cancel, allow_drop=False)
        except ContextOverflow as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except UserError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        return await _run(scheduler, generation, body.stream, request, _ChatShape(config.model_id, prepared),
                          include_usage=bool(body.stream_options and body.stream_options.include_usage))

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _check_model(body.model, config)
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "send one prompt per request", param="prompt")
        params = _params(body, config, engine, body.max_tokens or 16)
        cancel = threading.Event()
        try:
            generation = engine.complete(prompts[0], params, cancel=cancel)
        except ContextOverflow as exc:
            raise ApiError(400, str(exc), param="prompt", code="context_length_exceeded") from None
        return await _run(scheduler, generation, body.stream, request, _CompletionShape(config.model_id),
                          include_usage=bool(body.stream_options and body.stream_options.include_usage))

    return app


def _check_model(model: str, config: ServerConfig) -> None:
    if model != config.model_id:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {config.model_id!r}",
                       param="model", code="model_not_found")


def _params(body: _Sampling, config: ServerConfig, engine: Engine, max_tokens: int | None) -> SamplingParams:
    if max_tokens is not None and max_tokens > engine.n_ctx:
        raise ApiError(400, f"max_tokens {max_tokens} is larger than the model's context ({engine.n_ctx} tokens)",
                       param="max_tokens")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise ApiError(400, "at most 4 stop sequences", param="stop")
    changes = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p,
               "repeat_penalty": body.repeat_penalty, "presence_penalty": body.presence_penalty,
               "frequency_penalty": body.frequency_penalty, "max_tokens": max_tokens, "seed": body.seed,
               "grammar": body.grammar}
    params = replace(config.defaults, stop=tuple(s for s in stops if s),
                     **{k: v for k, v in changes.items() if v is not None})
    if body.grammar:
        problem = engine.grammar_problem(body.grammar)
        if problem:
            raise ApiError(400, problem, param="grammar")
    return params


def _messages(body: ChatRequest, config: ServerConfig) -> list[dict[str, Any]]:
    out = []
    for index, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if message.role == "developer" else message.role
        if role in ("system", "user", "tool") and content is None:
            raise ApiError(400, f"messages.{index}: a {message.role} message needs content", param=f"messages.{index}")
        item: dict[str, Any] = {"role": role, "content": content}
        if message.tool_calls:
            item["tool_calls"] = [{"id": call.id, "type": "function",
                                   "function": {"name": call.function.name, "arguments": call.function.arguments}}
                                  for call in message.tool_calls]
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        if role == "assistant" and content is None and not message.tool_calls:
            raise ApiError(400, f"messages.{index}: an assistant message needs content or tool_calls",
                           param=f"messages.{index}")
        out.append(item)
    if config.system and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": config.system})
    return out


# --- running and shaping the answer ------------------------------------------------------------------

class _ChatShape:
    """OpenAI chat.completion(.chunk) objects; tool calls recognised at the end of the generation."""

    object = "chat.completion"

    def __init__(self, model: str, prepared: Prepared):
        self.model, self.prepared = model, prepared
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        # Tool dialects: ReAct text is held back whole; a Llama 3.1 reply is held once it starts with "{".
        self.mode = {"react": "hold", "llama3.1": "sniff"}.get(prepared.dialect or "", "stream")
        self.held: list[str] = []

    def chunk(self, delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model,
                                "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage:
            data["usage"] = usage
        return data

    def start(self) -> list[dict[str, Any]]:
        return [self.chunk({"role": "assistant", "content": ""})]

    def delta(self, text: str) -> list[dict[str, Any]]:
        if self.mode == "sniff":
            self.held.append(text)
            joined = "".join(self.held).lstrip()
            if not joined:
                return []
            if joined.startswith(("{", "<|python_tag|>")):
                self.mode = "hold"
                return []
            self.mode, self.held = "stream", []
            return [self.chunk({"content": joined})]
        if self.mode == "hold":
            self.held.append(text)
            return []
        return [self.chunk({"content": text})]

    def end(self, generation: Generation) -> list[dict[str, Any]]:
        reply, finish = self._reply(generation)
        out = []
        if reply.tool_calls:
            calls = [dict(openai_call(call, arguments_as_string=True), index=i) for i, call in enumerate(reply.tool_calls)]
            out.append(self.chunk({"tool_calls": calls}))
        elif self.mode in ("hold", "sniff") and reply.content:
            out.append(self.chunk({"content": reply.content}))
        out.append(self.chunk({}, finish))
        return out

    def whole(self, generation: Generation) -> dict[str, Any]:
        reply, finish = self._reply(generation)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content if not reply.tool_calls else None}
        if reply.tool_calls:
            message["tool_calls"] = [openai_call(call, arguments_as_string=True) for call in reply.tool_calls]
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": _usage(generation)}

    def _reply(self, generation: Generation) -> tuple[Any, str]:
        reply = interpret(generation.text, self.prepared)
        if reply.tool_calls and generation.finish_reason != "cancelled":
            return reply, "tool_calls"
        if reply.tool_calls:
            reply = interpret(generation.text, Prepared([]))
        return reply, "length" if generation.finish_reason == "length" else "stop"


class _CompletionShape:
    object = "text_completion"

    def __init__(self, model: str):
        self.model = model
        self.id = "cmpl-" + uuid.uuid4().hex
        self.created = int(time.time())

    def chunk(self, text: str, finish: str | None = None, usage: dict | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                                "choices": [] if usage else [{"index": 0, "text": text, "logprobs": None,
                                                              "finish_reason": finish}]}
        if usage:
            data["usage"] = usage
        return data

    def start(self) -> list[dict[str, Any]]:
        return []

    def delta(self, text: str) -> list[dict[str, Any]]:
        return [self.chunk(text)]

    def end(self, generation: Generation) -> list[dict[str, Any]]:
        return [self.chunk("", "length" if generation.finish_reason == "length" else "stop")]

    def whole(self, generation: Generation) -> dict[str, Any]:
        finish = "length" if generation.finish_reason == "length" else "stop"
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": generation.text, "logprobs": None, "finish_reason": finish}],
                "usage": _usage(generation)}


def _usage(generation: Generation) -> dict[str, int]:
    prompt, completion = generation.stats.prompt_tokens, generation.stats.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


_DONE = object()


async def _run(scheduler: Scheduler, generation: Generation, stream: bool, request: Request, shape: Any,
               *, include_usage: bool) -> Any:
    if not scheduler.admit():
        return error_response(429, f"the server is busy ({scheduler.capacity} requests in flight); retry shortly",
                              type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    loop = asyncio.get_running_loop()
    if not stream:
        def run_whole() -> None:
            try:
                if not generation.cancel.is_set():
                    generation.result()
            finally:
                scheduler.release()

        try:
            await asyncio.shield(loop.run_in_executor(scheduler.executor, run_whole))
        except asyncio.CancelledError:  # the client went away: stop generating for it
            generation.cancel.set()
            raise
        return JSONResponse(shape.whole(generation))

    queue: asyncio.Queue[Any] = asyncio.Queue()

    def run_stream() -> None:
        try:
            if not generation.cancel.is_set():
                for delta in generation:
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
        except BaseException as exc:  # noqa: BLE001 - handed to the response
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            scheduler.release()
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

    loop.run_in_executor(scheduler.executor, run_stream)

    async def events() -> AsyncIterator[str]:
        try:
            for item in shape.start():
                yield _sse(item)
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    yield _sse({"error": {"message": f"{type(item).__name__}: {item}", "type": "server_error"}})
                    return
                for chunk in shape.delta(item):
                    yield _sse(chunk)
            for chunk in shape.end(generation):
                yield _sse(chunk)
            if include_usage:
                yield _sse(shape.chunk({}, usage=_usage(generation)) if isinstance(shape, _ChatShape)
                           else shape.chunk("", usage=_usage(generation)))
            yield "data: [DONE]\n\n"
        finally:
            generation.cancel.set()  # a no-op when finished; stops the model when the client left early

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def serve(engine: Engine, config: ServerConfig, *, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Run the API until Ctrl+C."""
    import uvicorn

    app = create_app(engine, config)
    print(f"edgezh serve: http://{host}:{port}/v1 — model {config.model_id!r} ({engine.format.name}, "
          f"ctx {engine.n_ctx}){' — API key required' if config.api_key else ''}", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: other machines can reach this server"
              f"{'' if config.api_key else ' without an API key'}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind
        if exc.code:
            raise UserError(f"cannot listen on {host}:{port} (in use, or not an address of this machine)") from None
    finally:
        scheduler: Scheduler = app.state.scheduler
        scheduler.executor.shutdown(wait=False, cancel_futures=True)
    return 0
