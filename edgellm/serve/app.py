"""The OpenAI-compatible HTTP app: validation, agents, SSE streaming and OpenAI-format errors around the Engine.

Agents: a request names its agent with the `X-Agent-Id` header or, failing that, OpenAI's `user` field (the
header wins). The agent's KV memory is reused (only new tokens are prefilled), saved after every request and
restored after a restart. A second request for an agent that is already generating waits in the queue. An agent
runs under the LoRA adapter of its first request: later requests naming none get it, one naming another is refused.
Requests without an agent reuse the longest matching prefix among a few anonymous caches.

Size limits keep one huge request from stalling the others (tokenizing runs in a worker thread, but parsing
JSON runs on the event loop): a token stands for at most `token_chars` characters of text (its longest vocab
entry, counted once per byte for byte-level BPE, which over-counts SentencePiece's '<0x0A>' or '▁'), so a prompt
longer than `context * token_chars` characters cannot fit and is refused before it is tokenized. A Unicode
normalizer (NFC) may merge up to 4 code points into one, so with one the bound is 4x wider. A chat template only
adds text to the messages (unless it trims them, when an over-long message of blanks is refused too). JSON
escapes a text byte into at most 6 bytes (a control character as \u0001), so a body that can hold a prompt that
fits is at most 6x that bound plus the message structure and the other fields (`max_body_bytes`, else 413).
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import cache, lru_cache

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from llguidance import LLTokenizer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import nn

from edgellm.agents import AgentStore, check_agent_name, is_agent_name
from edgellm.errors import EdgeLLMError, InvalidRequestError
from edgellm.grammar import Grammar, llg_tokenizer
from edgellm.kv.store import LeaseHeldError, StoreUnavailableError
from edgellm.models.lora import LoraAdapter
from edgellm.sampling import SamplingParams, TokenLogprob
from edgellm.sequence import check_prompt
from edgellm.serve import protocol as p
from edgellm.serve import tools as t
from edgellm.serve.metrics import ServerMetrics
from edgellm.serve.scheduler import Engine, Event, GenerationRequest
from edgellm.speculative import Speculation
from edgellm.tokenizer import Tokenizer

AGENT_HEADER = "x-agent-id"
OPEN_PATHS = {"/health"}  # reachable without the API key (liveness probes); details only with the key
AUTHORIZED = "edgellm.authorized"  # scope key: the request carried the API key (or none is configured)
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
GREEDY_BELOW = 1e-5  # sampling at a lower temperature is greedy in all but ties, and overflows float32 logits
MIN_TOP_P = 1e-8  # keeps only the top token for any vocabulary; a smaller top_p rounds to 0 in float32
# glibc keeps the heap pages a prefill's activations freed; malloc_trim hands them back (absent elsewhere: None)
MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)


def token_chars(tokenizer: Tokenizer) -> int:
    """The most characters of input text one token can stand for (see the module docstring)."""
    longest = max(map(len, tokenizer.backend.get_vocab(with_added_tokens=True)), default=1)
    return longest * (4 if tokenizer.backend.normalizer is not None else 1)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line and the offending field from pydantic's error list."""
    errors = exc.errors()
    # a union reports each member's complaint: a bad value (too long, lone surrogate) says more than a type mismatch
    err = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), errors[0])
    if err.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    if tuple(err.get("loc", ())) == ("body",):
        return "request body must be a JSON object", None
    # union members add their type name to the path (…, 'content', 'str'); the field path is what a client needs
    loc = [str(x) for x in err.get("loc", ()) if x != "body" and not (isinstance(x, str) and x in _TYPE_TAGS)]
    param = ".".join(x for x in loc if "[" not in x) or None
    return f"invalid value for '{param or 'body'}': {err.get('msg')}", param


class _Gate:
    """Plain ASGI middleware (BaseHTTPMiddleware would hide client disconnects): API key, body size limit, JSON
    body, counting."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: ServerMetrics, max_body_bytes: int) -> None:
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def refuse(self, scope: Scope, receive: Receive, send: Send, status: int, body: dict, endpoint: str) -> None:
        self.metrics.errors.labels(body["error"]["type"]).inc()
        self.metrics.requests.labels(endpoint, str(status)).inc()
        # close the connection: the unread rest of a refused body must not be parsed as the next request
        await JSONResponse(body, status_code=status, headers={"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        authorized = not self.expected or hmac.compare_digest(headers.get(b"authorization", b""), self.expected)
        scope[AUTHORIZED] = authorized
        if not authorized and scope["path"] not in OPEN_PATHS:
            body = p.error_body("missing or wrong API key; send 'Authorization: Bearer <key>'",
                                "authentication_error", code="invalid_api_key")
            return await self.refuse(scope, receive, send, 401, body, "unauthorized")
        if scope["method"] == "POST":  # like llama-server, read JSON whatever the Content-Type (curl -d sends a form)
            scope["headers"] = [*((k, v) for k, v in scope["headers"] if k != b"content-type"),
                                (b"content-type", b"application/json")]
            too_large = p.error_body(f"request body is larger than this server's limit of {self.max_body_bytes} "
                                     "bytes; no prompt that large fits the model's context window",
                                     code="request_too_large")
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_body_bytes:
                return await self.refuse(scope, receive, send, 413, too_large, "too_large")
            body = await self.read_body(receive)
            if body is None:
                return await self.refuse(scope, receive, send, 413, too_large, "too_large")
            receive = self.replay(body, receive)
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

    async def read_body(self, receive: Receive) -> bytes | None:
        """The whole body (a chunked one has no Content-Length to check up front), or None once over the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    @staticmethod
    def replay(body: bytes, receive: Receive) -> Receive:
        """Hands the app the body already read, then the connection's own messages (a disconnect)."""
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive_again() -> Message:
            return pending.pop() if pending else await receive()

        return receive_again


def create_app(model: nn.Module, tokenizer: Tokenizer, store: AgentStore, *, max_concurrency: int = 8,
               max_queue: int = 64, api_key: str | None = None, prefill_chunk: int = 512,
               kv_predictor: nn.Module | None = None, max_body_bytes: int | None = None,
               draft_model: nn.Module | None = None, speculation: Speculation | None = None) -> FastAPI:
    """A FastAPI app serving `model`; the engine thread starts and stops with the app's lifespan.

    With `kv_predictor`, a request with `"kv_prediction": true` gets its prompt's KV cache predicted.
    `speculation`: the speculative decoding a request without a `"speculative"` field gets (None: none);
    `draft_model` (sharing the tokenizer) serves mode "draft", the KV predictor's aux mode "kvpred".
    `max_body_bytes` defaults to the largest body a prompt that fits the context can need (module docstring).
    Call `app.state.begin_shutdown()` on the event loop when the server starts shutting down: running responses
    then end at once with an error (streams: an error event and [DONE]) instead of being cut off later.
    """
    metrics = ServerMetrics()
    engine = Engine(model, tokenizer, store, metrics, max_concurrency, max_queue, prefill_chunk,
                    kv_predictor=kv_predictor, draft_model=draft_model)
    model_id = getattr(model, "name", "edgellm")
    context = engine.context
    max_prompt_chars = context * token_chars(tokenizer)
    if max_body_bytes is None:  # escaped prompt text, then ~64 bytes of JSON per message/token and other fields
        max_body_bytes = 6 * max_prompt_chars + 64 * context + 2**16
    live: dict[int, GenerationRequest] = {}  # by id(): requests whose HTTP response is still being written
    closing = False
    trimmed = 0.0

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # fails what is left and flushes agent memories to disk

    app = FastAPI(title="edgellm", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.max_body_bytes, app.state.max_prompt_chars = max_body_bytes, max_prompt_chars

    def begin_shutdown() -> None:
        nonlocal closing
        closing = True
        for generation in live.values():
            generation.events.put_nowait(Event(error=p.ServeError("server is shutting down", 503, "server_error")))

    app.state.begin_shutdown = begin_shutdown

    def release_memory() -> None:
        """Once the engine is idle, give freed heap back to the OS (at most once a second: it walks the heap)."""
        nonlocal trimmed
        if MALLOC_TRIM is None or engine.active or engine.waiting or time.monotonic() - trimmed < 1:
            return
        trimmed = time.monotonic()
        asyncio.get_running_loop().run_in_executor(None, MALLOC_TRIM, 0)

    def done(generation: GenerationRequest) -> None:
        generation.cancel()  # a no-op once finished; frees the slot if the client left or the task was cancelled
        live.pop(id(generation), None)
        asyncio.get_running_loop().call_later(0.2, release_memory)  # the engine drops the sequence just after

    def error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
              code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.errors.labels(type).inc()
        return JSONResponse(p.error_body(message, type, param, code), status_code=status, headers=headers)

    app.add_middleware(_Gate, api_key=api_key, metrics=metrics, max_body_bytes=max_body_bytes)

    @app.exception_handler(p.ServeError)
    async def on_serve_error(_: Request, e: p.ServeError) -> JSONResponse:
        return error(e.status, str(e), e.type, e.param, e.code, e.headers)

    @app.exception_handler(EdgeLLMError)
    async def on_edgellm_error(_: Request, e: EdgeLLMError) -> JSONResponse:
        return error(400, str(e))

    @app.exception_handler(LeaseHeldError)  # another replica serves this agent: retry there, or after its lease
    async def on_lease_held(_: Request, e: LeaseHeldError) -> JSONResponse:
        return error(409, str(e), code="agent_leased")

    @app.exception_handler(StoreUnavailableError)
    async def on_store_unavailable(_: Request, e: StoreUnavailableError) -> JSONResponse:
        return error(503, str(e), "server_error", code="store_unavailable")

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
        if name != model_id and not name.startswith(f"{model_id}:"):
            raise p.ServeError(f"model {name!r} not found; this server serves {model_id!r}", 404,
                               "not_found_error", "model", "model_not_found")

    def request_adapter(body: p.SamplingFields) -> str | None:
        """The LoRA adapter a request names: by `model` "<base>:<adapter>" (as vLLM lists them) or by `adapter`."""
        named = body.model.removeprefix(f"{model_id}:") if body.model != model_id else None
        if named is not None and body.adapter is not None and named != body.adapter:
            raise p.ServeError(f"model {body.model!r} names adapter {named!r} but the adapter field says "
                               f"{body.adapter!r}; give one of them", param="adapter")
        name, param = (named, "model") if named is not None else (body.adapter, "adapter")
        if name is not None and name not in loaded_adapters():
            raise p.ServeError(f"adapter {name!r} is not loaded; this server has: "
                               f"{', '.join(sorted(loaded_adapters())) or 'none'}", 404 if param == "model" else 400,
                               "not_found_error" if param == "model" else "invalid_request_error", param,
                               "model_not_found" if param == "model" else None)
        return name

    def loaded_adapters() -> list[str]:
        registry = model.__dict__.get("adapters")
        return [] if registry is None else list(registry.loaded)

    def agent_name(request: Request, body: p.SamplingFields) -> str | None:
        """X-Agent-Id must be a valid agent name; OpenAI's free-form `user` (e.g. an e-mail) is hashed when not."""
        if name := request.headers.get(AGENT_HEADER):
            return check_agent_name(name)
        if not body.user:
            return None
        if is_agent_name(body.user):
            return body.user
        return "u-" + hashlib.sha256(body.user.encode()).hexdigest()[:16]

    def check_chars(chars: int, param: str) -> None:
        """Refuse, before tokenizing it, a prompt too long for any tokenization to fit the context."""
        if chars > max_prompt_chars:
            raise p.ServeError(f"prompt has {chars} characters but the model's context window is {context} tokens "
                               f"(at most {max_prompt_chars} characters); shorten it", param=param,
                               code="context_length_exceeded")

    def check_ids(ids: list[int], param: str) -> None:
        """The engine's prompt check, answered in OpenAI's shape before the request is queued."""
        try:
            check_prompt(ids, context)
        except EdgeLLMError as e:
            raise p.ServeError(str(e), param=param, code="context_length_exceeded" if ids else None) from e

    @lru_cache(maxsize=2**16)
    def token_text(token: int) -> str:
        """A token's own text for logprobs; special tokens (BOS) show as themselves rather than vanish."""
        return tokenizer.decode([token], skip_special_tokens=False)

    @cache
    def grammar_tokenizer() -> LLTokenizer:
        """Built on the first structured request: plain-text servers never pay for the token trie."""
        return llg_tokenizer(tokenizer, int(model.args.vocab_size))

    def response_grammar(response_format: p.ResponseFormat | None) -> Grammar | None:
        """The grammar `response_format` asks for: none for free text (blocks; run it off the event loop)."""
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return Grammar.json(grammar_tokenizer())
        if response_format.type == "json_schema":
            if response_format.json_schema is None:
                raise p.ServeError("response_format type json_schema needs a json_schema object",
                                   param="response_format.json_schema")
            try:
                return Grammar.json(grammar_tokenizer(), response_format.json_schema.schema_)
            except InvalidRequestError as e:
                raise p.ServeError(str(e), param="response_format.json_schema.schema") from e
        raise p.ServeError(f"response_format type {response_format.type!r} is not supported; use text, json_object "
                           "or json_schema", param="response_format.type")

    def request_grammar(body: p.SamplingFields, forced: bool = False) -> Grammar | None:
        """The edgellm `grammar` if given (alone: it cannot be combined with other constraints), else what
        `response_format` asks for (blocks; run it off the event loop)."""
        if body.grammar is None:
            return response_grammar(body.response_format)
        if forced or (body.response_format is not None and body.response_format.type != "text"):
            raise p.ServeError("grammar cannot be combined with a JSON response_format or a forced tool_choice",
                               param="grammar")
        try:
            return Grammar.raw(grammar_tokenizer(), body.grammar.type, body.grammar.value)
        except InvalidRequestError as e:
            raise p.ServeError(str(e), param="grammar") from e

    @cache
    def shared_speculation(mode: str, k: int, adaptive: bool, p_min: float) -> Speculation:
        """One Speculation per setting: its requests share the step times they measure."""
        return Speculation(mode, k, adaptive, p_min)

    def agent_adapter(agent: str, adapter: str | None) -> str | None:
        """The adapter an agent's request runs under: the one its memory was made with (400 when another is named).
        With a shared store, an agent not live here is leased now: while another replica holds it, the request is
        refused (409) before a stream begins, so a gateway can still send it elsewhere."""
        try:
            with engine.store_lock:
                chosen = store.agent_adapter(agent, adapter)[0]
        except InvalidRequestError as e:
            raise p.ServeError(str(e), param="adapter") from None
        if store.memory is not None and agent not in store.live:
            store.memory.hold(agent)
        return chosen

    async def submit(request: Request, body: p.SamplingFields, ids: list[int], max_tokens: int | None,
                     messages: list[dict] | None = None, logprobs: int | None = None,
                     echo: bool = False, grammar: Grammar | None = None) -> GenerationRequest:
        if closing:
            raise p.ServeError("server is shutting down", 503, "server_error")
        temperature = body.temperature if body.temperature >= GREEDY_BELOW else 0.0
        sampling = SamplingParams(temperature=temperature, top_k=body.top_k, top_p=max(body.top_p, MIN_TOP_P),
                                  min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                                  presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                                  seed=body.seed, logit_bias=body.token_bias(int(model.args.vocab_size)),
                                  grammar=grammar).validate()
        agent = agent_name(request, body)
        adapter = request_adapter(body)
        if agent is not None:  # reads the agent's saved header: off the event loop
            adapter = await asyncio.to_thread(agent_adapter, agent, adapter)
        if adapter is not None and body.kv_prediction:
            raise p.ServeError("kv_prediction predicts the base model's K/V, not an adapter's; use one or the other",
                               param="kv_prediction")
        if body.kv_prediction and kv_predictor is None:
            raise p.ServeError("kv_prediction needs a server started with --kv-predictor", param="kv_prediction")
        spec = speculation if body.speculative is None else (
            shared_speculation(body.speculative.mode, body.speculative.k, body.speculative.adaptive,
                               body.speculative.p_min)
            if body.speculative else None)
        if spec is not None and {"draft": draft_model, "kvpred": kv_predictor}.get(spec.mode, model) is None:
            raise p.ServeError(f"speculative mode {spec.mode!r} needs a server started with "
                               f"{'--draft-model' if spec.mode == 'draft' else '--kv-predictor'}", param="speculative")
        generation = GenerationRequest(
            ids=ids, max_tokens=context if max_tokens is None else max_tokens, sampling=sampling,  # clamped later
            loop=asyncio.get_running_loop(), stop=body.stop_list(), agent=agent, messages=messages if agent else None,
            kv_prediction=body.kv_prediction, speculation=spec, logprobs=logprobs, echo=echo, adapter=adapter)
        engine.submit(generation)
        live[id(generation)] = generation
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

    async def collect(request: Request, generation: GenerationRequest) -> list[Event]:
        """Wait for the whole answer, cancelling it if the client hangs up first."""
        events = []
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
                events.append(event)
                if event.finish:
                    return events
        finally:
            done(generation)

    def stream(generation: GenerationRequest, chunk: Callable[..., dict | None], include_usage: bool,
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
                    if (event.text or event.logprob) and (data := chunk(event.text, logprob=event.logprob)):
                        yield f"data: {json.dumps(data)}\n\n"
                    if event.finish:
                        yield f"data: {json.dumps(chunk(None, event.finish))}\n\n"
                        if include_usage:
                            yield f"data: {json.dumps(chunk(None, None, p.usage(*event.usage)))}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                done(generation)  # the client went away (or we are done): free the batch slot

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # Handlers that take the store lock are plain `def`: FastAPI runs them in a worker thread, so a long save on
    # the engine thread never stalls the event loop (and every stream with it).
    @app.get("/health")
    def health(request: Request) -> dict:
        """Liveness for anyone; the load and agent details only for holders of the API key."""
        if not request.scope.get(AUTHORIZED):
            return {"status": "ok"}
        with engine.store_lock:
            agents = store.stats()
        return {"status": "ok", "model": model_id, "active": engine.active, "queued": len(engine.waiting),
                "max_concurrency": max_concurrency, "max_queue": max_queue, "context": context, "agents": agents,
                "max_body_bytes": max_body_bytes,
                "kv_predictor": str(getattr(kv_predictor, "path", "loaded")) if kv_predictor is not None else None}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.set(len(engine.waiting))
        metrics.active.set(engine.active)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        base = {"id": model_id, "object": "model", "created": 0, "owned_by": "edgellm", "context_window": context}
        return {"object": "list", "data": [base, *({**base, "id": f"{model_id}:{name}", "parent": model_id}
                                                   for name in loaded_adapters())]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: p.ChatCompletionRequest) -> Response:
        check_model(body.model)
        body.check_refused()
        messages = [m.as_template_message() for m in body.messages]
        check_chars(sum(len(m["content"]) for m in messages), "messages")
        forced = t.forced_tool(body)
        use_tools = bool(body.tools) and body.tool_choice != "none"  # "none": the model is not told of the tools
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []] if use_tools else None
        # a long prompt must not stall other requests
        ids = await asyncio.to_thread(tokenizer.encode_chat, messages, tools=tools)
        check_ids(ids, "messages")
        if body.top_logprobs is not None and not body.logprobs:
            raise p.ServeError("top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if forced is None or body.grammar is not None:
            grammar = await asyncio.to_thread(request_grammar, body, forced is not None)
        else:
            grammar = await asyncio.to_thread(lambda: t.tool_grammar(body.tools or [], forced, grammar_tokenizer()))
        generation = await submit(request, body, ids, body.max_completion_tokens or body.max_tokens, messages,
                                  logprobs, grammar=grammar)
        id_, created = p.new_id("chatcmpl"), int(time.time())
        limit = 1 if body.parallel_tool_calls is False else None
        if body.stream:
            parser = t.ToolCallParser(limit) if use_tools else None
            calls_sent = 0

            def chunk(text: str | None, finish: str | None = None, usage: dict | None = None,
                      logprob: TokenLogprob | None = None) -> dict | None:
                """A chunk, or None while the text so far may be part of a tool call (and carries no logprob)."""
                nonlocal calls_sent
                delta: dict = {} if text is None else {"content": text}
                if parser is not None and usage is None:
                    content, calls = parser.feed(text or "")
                    content += parser.flush() if finish else ""
                    delta = {"content": content} if content else {}
                    if calls:
                        delta["tool_calls"] = t.stream_delta(calls, calls_sent)
                        calls_sent += len(calls)
                    if finish and calls_sent:
                        finish = "tool_calls"
                    if not delta and not finish and logprob is None:
                        return None
                scores = None if logprob is None else p.chat_logprobs([logprob], token_text)
                return p.chat_chunk(id_, model_id, created, delta, finish, usage, scores)
            first = p.chat_chunk(id_, model_id, created, {"role": "assistant", "content": ""})
            include = bool(body.stream_options and body.stream_options.include_usage)
            return stream(generation, chunk, include, first)
        events = await collect(request, generation)
        text, last = "".join(e.text for e in events), events[-1]
        content, calls = t.parse(text, limit) if use_tools else (text, [])
        scores = None if logprobs is None else p.chat_logprobs([e.logprob for e in events if e.logprob], token_text)
        return JSONResponse(p.chat_response(id_, model_id, content, "tool_calls" if calls else last.finish,
                                            p.usage(*last.usage), scores, calls))

    @app.post("/v1/completions")
    async def completions(request: Request, body: p.CompletionRequest) -> Response:
        check_model(body.model)
        body.check_refused()
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):  # a batch of prompts
            if len(prompt) != 1:
                raise p.ServeError("only one prompt per request is supported (n=1)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            check_chars(len(prompt), "prompt")
            ids = await asyncio.to_thread(tokenizer.encode, prompt) if prompt else []
        else:
            ids = list(prompt)
            vocab = int(model.args.vocab_size)
            if any(not 0 <= t < vocab for t in ids):
                raise p.ServeError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        check_ids(ids, "prompt")
        if body.max_tokens == 0 and not body.echo:
            raise p.ServeError("max_tokens must be >= 1 (0 only with echo: true, to score the prompt)",
                               param="max_tokens")
        if body.echo and body.stream:
            raise p.ServeError("echo is not supported with stream: true", param="echo")
        grammar = await asyncio.to_thread(request_grammar, body)
        generation = await submit(request, body, ids, body.max_tokens, logprobs=body.logprobs, echo=body.echo,
                                  grammar=grammar)
        id_, created = p.new_id("cmpl"), int(time.time())
        if body.stream:
            offset = 0  # characters streamed so far: where the next chunk's text_offset starts

            def chunk(text: str | None, finish: str | None = None, usage: dict | None = None,
                      logprob: TokenLogprob | None = None) -> dict:
                nonlocal offset
                scores = None if logprob is None else p.completion_logprobs([(logprob.token, logprob)], token_text,
                                                                             offset)
                offset += len(text or "")
                return p.completion_chunk(id_, model_id, created, text or "", finish, usage, scores)
            include = bool(body.stream_options and body.stream_options.include_usage)
            return stream(generation, chunk, include)
        events = await collect(request, generation)
        text, last = "".join(e.text for e in events), events[-1]
        echoed = (prompt if isinstance(prompt, str) else tokenizer.decode(ids)) if body.echo else ""
        scores = None
        if body.logprobs is not None:
            # echo: the prompt's tokens first (the first has nothing to be scored against), then the answer's
            scored = [(ids[0], None), *((i.token, i) for i in events[0].prompt_logprobs)] if body.echo else []
            parts = [p.completion_logprobs(scored, token_text),
                     p.completion_logprobs([(e.logprob.token, e.logprob) for e in events if e.logprob], token_text,
                                           len(echoed))]
            scores = {key: parts[0][key] + parts[1][key] for key in parts[0]}
        return JSONResponse(p.completion_response(id_, model_id, echoed + text, last.finish, p.usage(*last.usage),
                                                  scores))

    def agent_json(name: str) -> dict | None:
        with engine.store_lock:
            info = store.describe(name)
        return None if info is None else {"id": name, "object": "agent", **info}

    def adapter_json(adapter: LoraAdapter) -> dict:
        return {"id": f"{model_id}:{adapter.name}", "object": "adapter", "name": adapter.name,
                "path": str(adapter.path), "rank": adapter.rank, "bytes": adapter.nbytes}

    @app.get("/v1/adapters")
    def list_adapters() -> dict:
        registry = model.__dict__.get("adapters")
        return {"object": "list", "data": [adapter_json(a) for a in (registry.loaded if registry else {}).values()]}

    @app.post("/v1/adapters")
    async def load_adapter(body: p.AdapterLoad) -> dict:
        return adapter_json(await asyncio.to_thread(engine.load_adapter, body.name, body.path))

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict:
        try:
            await asyncio.to_thread(engine.unload_adapter, name)
        except InvalidRequestError as e:
            raise p.ServeError(str(e), 404, "not_found_error", code="adapter_not_found") from None
        return {"id": f"{model_id}:{name}", "object": "adapter", "deleted": True}

    @app.get("/v1/agents")
    def list_agents() -> dict:
        with engine.store_lock:
            agents = store.describe_all()
        return {"object": "list", "data": [{"id": a["name"], "object": "agent", **a} for a in agents]}

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
