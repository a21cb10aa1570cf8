"""The OpenAI-compatible HTTP app: validation, agents, SSE streaming and OpenAI-format errors around the Engine.

Agents: a request names its agent with the `X-Agent-Id` header or, failing that, OpenAI's `user` field (the
header wins). The agent's KV memory is reused (only new tokens are prefilled), saved after every request and
restored after a restart. A second request for an agent that is already generating waits in the queue.
Requests without an agent reuse the longest matching prefix among a few anonymous caches.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import nn

from edgellm.agents import AgentStore, check_agent_name, is_agent_name
from edgellm.errors import EdgeLLMError
from edgellm.sampling import SamplingParams
from edgellm.serve import protocol as p
from edgellm.serve.metrics import ServerMetrics
from edgellm.serve.scheduler import Engine, Event, GenerationRequest
from edgellm.tokenizer import Tokenizer

AGENT_HEADER = "x-agent-id"
OPEN_PATHS = {"/health"}  # reachable without the API key (liveness probes)
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line and the offending field from pydantic's error list."""
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if tuple(err.get("loc", ())) == ("body",):
        return "request body must be a JSON object", None
    # union members add their type name to the path (…, 'content', 'str'); the field path is what a client needs
    loc = [str(x) for x in err.get("loc", ()) if x != "body" and not (isinstance(x, str) and x in _TYPE_TAGS)]
    param = ".".join(x for x in loc if "[" not in x) or None
    return f"invalid value for '{param or 'body'}': {err.get('msg')}", param


class _Gate:
    """Plain ASGI middleware (BaseHTTPMiddleware would hide client disconnects): API key, JSON body, counting."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected and scope["path"] not in OPEN_PATHS and \
                not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            self.metrics.errors.labels("authentication_error").inc()
            self.metrics.requests.labels("unauthorized", "401").inc()
            body = p.error_body("missing or wrong API key; send 'Authorization: Bearer <key>'",
                                "authentication_error", code="invalid_api_key")
            return await JSONResponse(body, status_code=401)(scope, receive, send)
        if scope["method"] == "POST":  # like llama-server, read JSON whatever the Content-Type (curl -d sends a form)
            scope["headers"] = [*((k, v) for k, v in scope["headers"] if k != b"content-type"),
                                (b"content-type", b"application/json")]
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(getattr(scope.get("route"), "path", "unmatched"), str(status)).inc()


def create_app(model: nn.Module, tokenizer: Tokenizer, store: AgentStore, *, max_concurrency: int = 8,
               max_queue: int = 64, api_key: str | None = None, prefill_chunk: int = 512,
               kv_predictor: nn.Module | None = None) -> FastAPI:
    """A FastAPI app serving `model`; the engine thread starts and stops with the app's lifespan.

    With `kv_predictor`, a request with `"kv_prediction": true` gets its prompt's KV cache predicted.
    """
    metrics = ServerMetrics()
    engine = Engine(model, tokenizer, store, metrics, max_concurrency, max_queue, prefill_chunk,
                    kv_predictor=kv_predictor)
    model_id = getattr(model, "name", "edgellm")
    context = engine.context

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # fails what is left and flushes agent memories to disk

    app = FastAPI(title="edgellm", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics

    def error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
              code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.errors.labels(type).inc()
        return JSONResponse(p.error_body(message, type, param, code), status_code=status, headers=headers)

    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)

    @app.exception_handler(p.ServeError)
    async def on_serve_error(_: Request, e: p.ServeError) -> JSONResponse:
        return error(e.status, str(e), e.type, e.param, e.code, e.headers)

    @app.exception_handler(EdgeLLMError)
    async def on_edgellm_error(_: Request, e: EdgeLLMError) -> JSONResponse:
        return error(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        return error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else
                     "invalid_request_error", headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, e: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    def check_model(name: str) -> None:
        if name != model_id:
            raise p.ServeError(f"model {name!r} not found; this server serves {model_id!r}", 404,
                               "not_found_error", "model", "model_not_found")

    def agent_name(request: Request, body: p.SamplingFields) -> str | None:
        """X-Agent-Id must be a valid agent name; OpenAI's free-form `user` (e.g. an e-mail) is hashed when not."""
        if name := request.headers.get(AGENT_HEADER):
            return check_agent_name(name)
        if not body.user:
            return None
        if is_agent_name(body.user):
            return body.user
        return "u-" + hashlib.sha256(body.user.encode()).hexdigest()[:16]

    def check_ids(ids: list[int], param: str) -> None:
        if not ids:
            raise p.ServeError("prompt is empty; give at least one token", param=param)
        if len(ids) >= context:
            raise p.ServeError(f"prompt has {len(ids)} tokens but the model's context window is {context}; "
                               "shorten it", param=param, code="context_length_exceeded")

    def submit(request: Request, body: p.SamplingFields, ids: list[int], max_tokens: int | None,
               messages: list[dict] | None = None) -> GenerationRequest:
        sampling = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                  min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                                  presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                                  seed=body.seed).validate()
        agent = agent_name(request, body)
        if body.kv_prediction and kv_predictor is None:
            raise p.ServeError("kv_prediction needs a server started with --kv-predictor", param="kv_prediction")
        generation = GenerationRequest(
            ids=ids, max_tokens=max_tokens or context, sampling=sampling,  # the sequence clamps it to the window
            loop=asyncio.get_running_loop(), stop=body.stop_list(), agent=agent, messages=messages if agent else None,
            kv_prediction=body.kv_prediction)
        engine.submit(generation)
        return generation

    async def next_event(generation: GenerationRequest, request: Request | None = None) -> Event:
        """The engine's next message; never waits forever on a dead engine or (with `request`) a gone client."""
        while True:
            try:
                return await asyncio.wait_for(generation.events.get(), timeout=1.0)
            except TimeoutError:
                if not engine.thread.is_alive():
                    return Event(error=p.ServeError("the inference engine has stopped", 503, "server_error"))
                if request is not None and await request.is_disconnected():
                    return Event(error=p.ServeError("client disconnected", 499))

    async def collect(request: Request, generation: GenerationRequest) -> tuple[str, Event]:
        """Wait for the whole answer, cancelling it if the client hangs up first."""
        pieces = []
        checked = time.monotonic()
        try:
            while True:
                if time.monotonic() - checked > 0.5:  # tokens may arrive without pause: look for a hang-up anyway
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise p.ServeError("client disconnected", 499)
                event = await next_event(generation, request)
                if event.error:
                    raise event.error
                pieces.append(event.text)
                if event.finish:
                    return "".join(pieces), event
        finally:
            generation.cancel()  # a no-op once finished; frees the slot if the client left or this task was cancelled

    def stream(generation: GenerationRequest, chunk: Callable[..., dict], include_usage: bool,
               first: dict | None = None) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                while True:
                    event = await next_event(generation)
                    if event.error:
                        e = event.error
                        body = p.error_body(str(e), getattr(e, "type", "server_error"), code=getattr(e, "code", None))
                        yield f"data: {json.dumps(body)}\n\n"
                        break
                    if event.text:
                        yield f"data: {json.dumps(chunk(event.text))}\n\n"
                    if event.finish:
                        yield f"data: {json.dumps(chunk(None, event.finish))}\n\n"
                        if include_usage:
                            yield f"data: {json.dumps(chunk(None, None, p.usage(*event.usage)))}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                generation.cancel()  # the client went away (or we are done): free the batch slot

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # Handlers that take the store lock are plain `def`: FastAPI runs them in a worker thread, so a long save on
    # the engine thread never stalls the event loop (and every stream with it).
    @app.get("/health")
    def health() -> dict:
        with engine.store_lock:
            agents = store.stats()
        return {"status": "ok", "model": model_id, "active": engine.active, "queued": len(engine.waiting),
                "max_concurrency": max_concurrency, "max_queue": max_queue, "context": context, "agents": agents,
                "kv_predictor": str(getattr(kv_predictor, "path", "loaded")) if kv_predictor is not None else None}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.set(len(engine.waiting))
        metrics.active.set(engine.active)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "edgellm", "context_window": context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: p.ChatCompletionRequest) -> Response:
        check_model(body.model)
        messages = [m.as_template_message() for m in body.messages]
        ids = tokenizer.encode_chat(messages)
        check_ids(ids, "messages")
        generation = submit(request, body, ids, body.max_completion_tokens or body.max_tokens, messages)
        id_, created = p.new_id("chatcmpl"), int(time.time())
        if body.stream:
            def chunk(text: str | None, finish: str | None = None, usage: dict | None = None) -> dict:
                delta = {} if text is None else {"content": text}
                return p.chat_chunk(id_, model_id, created, delta, finish, usage)
            first = p.chat_chunk(id_, model_id, created, {"role": "assistant", "content": ""})
            include = bool(body.stream_options and body.stream_options.include_usage)
            return stream(generation, chunk, include, first)
        text, last = await collect(request, generation)
        return JSONResponse(p.chat_response(id_, model_id, text, last.finish, p.usage(*last.usage)))

    @app.post("/v1/completions")
    async def completions(request: Request, body: p.CompletionRequest) -> Response:
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise p.ServeError("only one prompt per request is supported (n=1)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt) if prompt else []
        else:
            ids = list(prompt)
            vocab = int(model.args.vocab_size)
            if any(not 0 <= t < vocab for t in ids):
                raise p.ServeError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        check_ids(ids, "prompt")
        generation = submit(request, body, ids, body.max_tokens)
        id_, created = p.new_id("cmpl"), int(time.time())
        if body.stream:
            def chunk(text: str | None, finish: str | None = None, usage: dict | None = None) -> dict:
                return p.completion_chunk(id_, model_id, created, text or "", finish, usage)
            include = bool(body.stream_options and body.stream_options.include_usage)
            return stream(generation, chunk, include)
        text, last = await collect(request, generation)
        return JSONResponse(p.completion_response(id_, model_id, text, last.finish, p.usage(*last.usage)))

    def agent_json(name: str, listed: dict[str, dict] | None = None) -> dict | None:
        with engine.store_lock:
            if listed is None:
                listed = {i.name: i.to_json() for i in store.list()}
            saved = listed.get(name)
            live = store.live.get(name)
            if saved is None and live is None:
                return None
            info = saved or {"name": name, "tokens": 0, "file_bytes": 0, "kv_format": str(store.kv_format)}
            if live is not None:
                info.update(tokens=len(live.cache.tokens), live=True, live_bytes=live.nbytes,
                            messages=len(live.messages))
            return {"id": name, "object": "agent", "live": False, **info}

    @app.get("/v1/agents")
    def list_agents() -> dict:
        with engine.store_lock:
            listed = {i.name: i.to_json() for i in store.list()}
            names = sorted(set(listed) | set(store.live))
        return {"object": "list", "data": [a for n in names if (a := agent_json(n, listed))]}

    @app.get("/v1/agents/{name}")
    def get_agent(name: str) -> dict:
        info = agent_json(check_agent_name(name))
        if info is None:
            raise p.ServeError(f"agent {name!r} not found", 404, "not_found_error", code="agent_not_found")
        return info

    @app.delete("/v1/agents/{name}")
    def delete_agent(name: str) -> dict:
        if not engine.delete_agent(check_agent_name(name)):
            raise p.ServeError(f"agent {name!r} not found", 404, "not_found_error", code="agent_not_found")
        return {"id": name, "object": "agent", "deleted": True}

    return app
