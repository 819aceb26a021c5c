"""`edgezh serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the runtime engine.

Routes: `POST /v1/chat/completions` (streaming or not, `tools`, `response_format`, `logprobs` /
`top_logprobs`, `n`, `seed`), `POST /v1/completions`, `GET /v1/models`, `GET /health`. The same
`Engine` as the terminal chat renders prompts with the template registry, stops on every stop
token of the format and streams UTF-8-safe text; tool calls are parsed by `toolcalls` (Llama 3.1
JSON for the llama3.1 format, ReAct otherwise) and returned as OpenAI `tool_calls`.

Concurrency: the engine decodes up to `parallel` sequences together in one llama.cpp context
(continuous batching, `edgezh.runtime.batch`); a request with `n` choices is `n` sequences. At most
`queue_size` more sequences wait for a slot, and a request past that gets 429 at once. A client
that disconnects — streaming or not — cancels its sequences, which leave their slots at the next
decode step. Errors are OpenAI-style JSON (`{"error": {"message", "type", "param", "code"}}`) with
a 4xx status for anything the client sent wrong. `--api-key` requires `Authorization: Bearer KEY`
on /v1 routes.

Models: `/v1/models` lists `<model-id>` (the base alone) and `<model-id>:<set>` for each LoRA adapter
set loaded with `--lora`; a request's `model` picks the set it decodes with, and requests for
different sets decode concurrently (the decode loop groups rows by set). Another `model` is a 404.

Structured output: `response_format` `json_object` / `json_schema` becomes a llama.cpp grammar
(`structured`); a schema keyword the grammar cannot enforce is a 400 naming it. Extensions beyond
OpenAI's fields (as llama.cpp's servers accept them): `top_k`, `min_p`, `repeat_penalty`,
`grammar` (GBNF).
"""

from __future__ import annotations

import asyncio
import collections
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgezh.errors import UserError
from edgezh.runtime.engine import MAX_TOP_LOGPROBS, ContextOverflow, Engine, Generation, SamplingParams
from edgezh.runtime.structured import SchemaError, grammar_for
from edgezh.runtime.toolcalls import Prepared, interpret, openai_call, prepare

MAX_CHOICES = 16


@dataclass
class ServerConfig:
    model_id: str
    api_key: str | None = None
    queue_size: int = 8
    """Sequences that may wait for a decode slot; past that, 429."""
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
    stream: bool = False
    stream_options: StreamOptions | None = None
    grammar: str | None = None


class ChatRequest(_Sampling):
    messages: list[MessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    response_format: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    n: int = Field(1, ge=1, le=1)
    logprobs: int | None = None


# --- admission ---------------------------------------------------------------------------------------

class Admission:
    """Sequences in flight (decoding or waiting for a slot): at most `parallel + queue_size`."""

    def __init__(self, engine: Engine, queue_size: int):
        self.engine = engine
        self.capacity = engine.parallel + queue_size
        self._lock = threading.Lock()
        self.in_flight = 0

    def admit(self, n: int) -> bool:
        with self._lock:
            if self.in_flight + n > self.capacity:
                return False
            self.in_flight += n
            return True

    def release(self, n: int = 1) -> None:
        with self._lock:
            self.in_flight -= n

    def state(self) -> dict[str, int]:
        with self._lock:
            return {"in_flight": self.in_flight, "capacity": self.capacity, "parallel": self.engine.parallel,
                    **self.engine.loop.state()}


# --- the app -----------------------------------------------------------------------------------------

def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="edgezh", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    admission = Admission(engine, config.queue_size)
    app.state.engine, app.state.config, app.state.admission = engine, config, admission
    created = int(time.time())
    served = served_models(engine, config)

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
                "queue": admission.state()}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "edgezh"}
                                           for model in served]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        adapters = _check_model(body.model, served)
        params = _params(body, config, engine, body.max_completion_tokens or body.max_tokens)
        if body.response_format is not None:
            if body.grammar:
                raise ApiError(400, "send either grammar or response_format, not both", param="response_format")
            try:
                params = replace(params, grammar=grammar_for(body.response_format))
            except SchemaError as exc:
                raise ApiError(400, f"response_format.{exc}", param=f"response_format.{exc.path}".rstrip("."),
                               code="unsupported_schema" if exc.keyword else None) from None
        if body.logprobs:
            params = replace(params, logprobs=body.top_logprobs or 0)
        elif body.top_logprobs is not None:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.n > admission.capacity:
            raise ApiError(400, f"n={body.n} is more sequences than this server holds at once ({admission.capacity})",
                           param="n")
        messages = _messages(body, config)
        tools = [t.model_dump() for t in body.tools] if body.tools and body.tool_choice != "none" else None
        prepared = prepare(messages, engine.format.supports_tools, tools)
        cancel = threading.Event()
        generations = []
        try:
            for index in range(body.n):
                seed = params.seed + index if params.seed is not None else None
                generations.append(engine.chat(prepared.messages, replace(params, stop=params.stop + prepared.stop,
                                                                          seed=seed),
                                               tools=prepared.tools, cancel=cancel, allow_drop=False,
                                               adapters=adapters))
        except ContextOverflow as exc:
            raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
        except UserError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        return await _run(admission, generations, body.stream, request, _ChatShape(body.model, prepared, engine),
                          include_usage=bool(body.stream_options and body.stream_options.include_usage))

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        adapters = _check_model(body.model, served)
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if body.logprobs is not None:
            raise ApiError(400, "logprobs are supported on /v1/chat/completions only", param="logprobs")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "send one prompt per request", param="prompt")
        params = _params(body, config, engine, body.max_tokens or 16)
        cancel = threading.Event()
        try:
            generation = engine.complete(prompts[0], params, cancel=cancel, adapters=adapters)
        except ContextOverflow as exc:
            raise ApiError(400, str(exc), param="prompt", code="context_length_exceeded") from None
        return await _run(admission, [generation], body.stream, request, _CompletionShape(body.model),
                          include_usage=bool(body.stream_options and body.stream_options.include_usage))

    return app


def served_models(engine: Engine, config: ServerConfig) -> dict[str, str | None]:
    """Model id → the LoRA adapter set it decodes with: `<model-id>` the base, `<model-id>:<set>` each set."""
    return {config.model_id: None, **{f"{config.model_id}:{item.name}": item.name for item in engine.adapter_sets}}


def _check_model(model: str, served: dict[str, str | None]) -> str | None:
    """The adapter set of a served model id (None: the base); 404 for another id."""
    if model not in served:
        names = ", ".join(repr(name) for name in served)
        raise ApiError(404, f"model {model!r} does not exist; this server serves {names}",
                       param="model", code="model_not_found")
    return served[model]


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
    """OpenAI chat.completion(.chunk) objects; tool calls recognised at the end of each choice."""

    object = "chat.completion"

    def __init__(self, model: str, prepared: Prepared, engine: Engine):
        self.model, self.prepared, self.engine = model, prepared, engine
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.created = int(time.time())
        # Tool dialects: ReAct text is held back whole; a Llama 3.1 reply is held once it starts with "{".
        first = {"react": "hold", "llama3.1": "sniff"}.get(prepared.dialect or "", "stream")
        self.mode: dict[int, str] = collections.defaultdict(lambda: first)
        self.held: dict[int, list[str]] = collections.defaultdict(list)
        self.held_logprobs: dict[int, list] = collections.defaultdict(list)

    def chunk(self, index: int, delta: dict[str, Any], finish: str | None = None, logprobs: list | None = None,
              ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage}

    def start(self, n: int) -> list[dict[str, Any]]:
        return [self.chunk(index, {"role": "assistant", "content": ""}) for index in range(n)]

    def delta(self, index: int, generation: Generation, text: str, entries: list) -> list[dict[str, Any]]:
        logprobs = _chat_logprobs(self.engine, entries) if generation.params.logprobs is not None else None
        mode = self.mode[index]
        if mode == "sniff":
            self.held[index].append(text)
            self.held_logprobs[index].extend(logprobs or [])
            joined = "".join(self.held[index]).lstrip()
            if not joined:
                return []
            if joined.startswith(("{", "<|python_tag|>")):
                self.mode[index] = "hold"
                return []
            held, self.held[index], self.held_logprobs[index] = self.held_logprobs[index], [], []
            self.mode[index] = "stream"
            return [self.chunk(index, {"content": joined}, logprobs=held if logprobs is not None else None)]
        if mode == "hold":
            self.held[index].append(text)
            self.held_logprobs[index].extend(logprobs or [])
            return []
        return [self.chunk(index, {"content": text}, logprobs=logprobs)] if text or logprobs else []

    def end(self, index: int, generation: Generation) -> list[dict[str, Any]]:
        reply, finish = self._reply(generation)
        out = []
        if reply.tool_calls:
            calls = [dict(openai_call(call, arguments_as_string=True), index=i) for i, call in enumerate(reply.tool_calls)]
            out.append(self.chunk(index, {"tool_calls": calls}))
        elif self.mode[index] in ("hold", "sniff") and reply.content:
            held = self.held_logprobs[index] if generation.params.logprobs is not None else None
            out.append(self.chunk(index, {"content": reply.content}, logprobs=held))
        out.append(self.chunk(index, {}, finish))
        return out

    def whole(self, generations: list[Generation]) -> dict[str, Any]:
        choices = []
        for index, generation in enumerate(generations):
            reply, finish = self._reply(generation)
            message: dict[str, Any] = {"role": "assistant", "content": reply.content if not reply.tool_calls else None}
            if reply.tool_calls:
                message["tool_calls"] = [openai_call(call, arguments_as_string=True) for call in reply.tool_calls]
            logprobs = ({"content": _chat_logprobs(self.engine, generation.logprobs)}
                        if generation.params.logprobs is not None else None)
            choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs})
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": _usage(generations)}

    def _reply(self, generation: Generation) -> tuple[Any, str]:
        reply = interpret(generation.text, self.prepared)
        if reply.tool_calls and generation.finish_reason != "cancelled":
            return reply, "tool_calls"
        if reply.tool_calls:
            reply = interpret(generation.text, Prepared([]))
        return reply, "length" if generation.finish_reason == "length" else "stop"


def _chat_logprobs(engine: Engine, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Engine logprob entries as OpenAI's `logprobs.content` items (token text, logprob, bytes, top)."""
    def item(token: int, logprob: float) -> dict[str, Any]:
        piece = engine.pieces(token)
        return {"token": piece.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(piece)}

    return [{**item(entry["token"], entry["logprob"]),
             "top_logprobs": [item(token, logprob) for token, logprob in entry["top"]]} for entry in entries]


class _CompletionShape:
    object = "text_completion"

    def __init__(self, model: str):
        self.model = model
        self.id = "cmpl-" + uuid.uuid4().hex
        self.created = int(time.time())

    def chunk(self, index: int, text: str, finish: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

    def usage_chunk(self, usage: dict) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [], "usage": usage}

    def start(self, n: int) -> list[dict[str, Any]]:
        return []

    def delta(self, index: int, generation: Generation, text: str, entries: list) -> list[dict[str, Any]]:
        return [self.chunk(index, text)] if text else []

    def end(self, index: int, generation: Generation) -> list[dict[str, Any]]:
        return [self.chunk(index, "", "length" if generation.finish_reason == "length" else "stop")]

    def whole(self, generations: list[Generation]) -> dict[str, Any]:
        choices = [{"index": index, "text": g.text, "logprobs": None,
                    "finish_reason": "length" if g.finish_reason == "length" else "stop"}
                   for index, g in enumerate(generations)]
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": _usage(generations)}


def _usage(generations: list[Generation]) -> dict[str, int]:
    prompt = generations[0].stats.prompt_tokens
    completion = sum(g.stats.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _run(admission: Admission, generations: list[Generation], stream: bool, request: Request, shape: Any,
               *, include_usage: bool) -> Any:
    if not admission.admit(len(generations)):
        return error_response(429, f"the server is busy ({admission.capacity} sequences in flight or waiting); "
                              "retry shortly", type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    engine = generations[0].engine
    cancel = generations[0].cancel  # one event for every choice of the request

    def sink_for(index: int):
        def sink(text: str | None, entries: list) -> None:  # in the decode thread
            if text is None:
                admission.release()
            if stream or text is None:
                loop.call_soon_threadsafe(events.put_nowait, (index, text, entries))
        return sink

    for index, generation in enumerate(generations):
        generation.start(sink_for(index))

    def stop() -> None:
        cancel.set()
        engine.loop.wake()

    if not stream:
        left = len(generations)
        try:
            while left:
                try:
                    await asyncio.wait_for(events.get(), timeout=0.5)
                    left -= 1
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        stop()
        except asyncio.CancelledError:  # the client went away: stop generating for it
            stop()
            raise
        errors = [g.error for g in generations if g.error is not None]
        if errors:
            raise errors[0]
        return JSONResponse(shape.whole(generations))

    async def chunks() -> AsyncIterator[str]:
        try:
            for item in shape.start(len(generations)):
                yield _sse(item)
            left = len(generations)
            while left:
                index, text, entries = await events.get()
                generation = generations[index]
                if text is None:
                    left -= 1
                    if generation.error is not None:
                        yield _sse({"error": {"message": f"{type(generation.error).__name__}: {generation.error}",
                                              "type": "server_error"}})
                        return
                    for chunk in shape.end(index, generation):
                        yield _sse(chunk)
                    continue
                for chunk in shape.delta(index, generation, text, entries):
                    yield _sse(chunk)
            if include_usage:
                yield _sse(shape.usage_chunk(_usage(generations)))
            yield "data: [DONE]\n\n"
        finally:
            stop()  # a no-op when finished; frees the slots when the client left early

    return StreamingResponse(chunks(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def serve(engine: Engine, config: ServerConfig, *, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Run the API until Ctrl+C."""
    import uvicorn

    app = create_app(engine, config)
    with_lora = list(served_models(engine, config))[1:]
    print(f"edgezh serve: http://{host}:{port}/v1 — model {config.model_id!r} ({engine.format.name}, "
          f"ctx {engine.n_ctx}, {engine.parallel} parallel, queue {config.queue_size})"
          f"{' — with LoRA: ' + ', '.join(repr(m) for m in with_lora) if with_lora else ''}"
          f"{' — API key required' if config.api_key else ''}", flush=True)
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
        engine.close()
    return 0
