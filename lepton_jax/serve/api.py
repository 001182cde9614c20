"""The OpenAI-compatible HTTP layer (FastAPI): handlers validate, enqueue into the engine and
stream; they never run the model.

  GET  /v1/models, /health, /metrics, /tokenizer_info
  POST /v1/completions, /v1/chat/completions, /tokenize, /detokenize

Request and response shapes are OpenAI's (and vLLM's for the tokenizer endpoints), so the
`openai` client and lm-evaluation-harness's `local-completions` work unchanged. Errors are
`{"error": {"message", "type", "param", "code"}}` with `code` the HTTP status.

A text prompt starts where the model's documents start: after the tokenizer's bos, or its eos
when it has none (as lepton-eval scores text); a prompt of token ids is used as given.
"""
import asyncio
import dataclasses
import json
import secrets
import time
from typing import Any, AsyncIterator, Literal, Sequence

import fastapi
from fastapi import responses
import pydantic

from lepton_jax.data import tokenizers
from lepton_jax.evals import scoring
from lepton_jax.serve import detokenize, engine as engine_lib, metrics as metrics_lib

ERROR_TYPES = {400: 'invalid_request_error', 401: 'authentication_error', 404: 'not_found_error',
               405: 'invalid_request_error', 413: 'invalid_request_error',
               500: 'internal_server_error', 503: 'service_unavailable_error'}


class APIError(Exception):
  """An error answered with OpenAI's body and `status`."""

  def __init__(self, status: int, message: str, param: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param = status, message, param

  def response(self) -> responses.JSONResponse:
    return responses.JSONResponse(error_body(self.status, self.message, self.param), self.status)


def error_body(status: int, message: str, param: str | None = None) -> dict:
  return {'error': {'message': message, 'type': ERROR_TYPES.get(status, 'invalid_request_error'),
                    'param': param, 'code': status}}


@dataclasses.dataclass
class Served:
  """What the server serves and how: the engine, its tokenizer and model name, and the rules."""
  engine: engine_lib.Engine
  tokenizer: tokenizers.Tokenizer
  name: str
  vocab_size: int
  chat: Any = None  # messages -> prompt ids; None: chat answers 400 with `chat_error`.
  chat_error: str = 'this model has no chat template'
  tokenizer_info: dict = dataclasses.field(default_factory=dict)
  api_key: str | None = None
  max_body_bytes: int = 4 * 2**20
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))

  def __post_init__(self):
    self.metrics = metrics_lib.Metrics(self.engine)
    self.stop_ids = set(self.tokenizer.eos_ids)


# --- request bodies -----------------------------------------------------------------------------

class Body(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra='ignore')  # Clients send fields we do not use.


class StreamOptions(Body):
  include_usage: bool = False


class Sampling(Body):
  """The fields completions and chat share."""
  model: str | None = None
  max_tokens: int | None = None
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0  # -1 (vLLM's off) is 0.
  min_p: float = 0.0
  stop: str | list[str] | None = None
  seed: int | None = None
  n: int = 1
  stream: bool = False
  stream_options: StreamOptions | None = None


class CompletionBody(Sampling):
  prompt: str | list[str] | list[int] | list[list[int]]
  logprobs: int | None = None
  echo: bool = False


class ChatBody(Sampling):
  messages: list[dict]
  max_completion_tokens: int | None = None
  logprobs: bool = False
  top_logprobs: int | None = None


class TokenizeBody(Body):
  model: str | None = None
  prompt: str | None = None
  messages: list[dict] | None = None
  add_special_tokens: bool = True
  add_generation_prompt: bool = True


class DetokenizeBody(Body):
  model: str | None = None
  tokens: list[int]


def parse(body_type: type[Body], raw: bytes) -> Body:
  try:
    data = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise APIError(400, f'the body is not valid JSON: {e}') from None
  if not isinstance(data, dict):
    raise APIError(400, f'the body must be a JSON object, got {type(data).__name__}')
  try:
    return body_type.model_validate(data)
  except pydantic.ValidationError as e:
    first = e.errors()[0]
    param = str(first['loc'][0]) if first['loc'] else None
    value = json.dumps(first['input'])[:60] if first['type'] != 'missing' else 'missing'
    raise APIError(400, f'{param}={value}: {first["msg"]}', param) from None


# --- checks -------------------------------------------------------------------------------------

def check_sampling(body: Sampling, max_n: int) -> None:
  """Raises APIError(400) naming the first field outside its range."""
  if body.temperature < 0:
    raise APIError(400, f'temperature={body.temperature}: must be >= 0 (0 is greedy)',
                   'temperature')
  if not 0 < body.top_p <= 1:
    raise APIError(400, f'top_p={body.top_p}: must be in (0, 1]', 'top_p')
  if body.top_k < -1:
    raise APIError(400, f'top_k={body.top_k}: must be >= 0 (0 or -1 keeps every token)', 'top_k')
  if not 0 <= body.min_p <= 1:
    raise APIError(400, f'min_p={body.min_p}: must be in [0, 1]', 'min_p')
  if not 1 <= body.n <= max_n:
    raise APIError(400, f'n={body.n}: must be in [1, {max_n}]', 'n')
  if body.max_tokens is not None and body.max_tokens < 0:
    raise APIError(400, f'max_tokens={body.max_tokens}: must be >= 0', 'max_tokens')


def check_prompt(served: Served, ids: Sequence[int], index: int) -> None:
  limit = served.engine.max_seq_len
  if not ids:
    raise APIError(400, f'prompt {index} is empty: give at least one token', 'prompt')
  if len(ids) > limit:
    raise APIError(400, f'prompt {index} has {len(ids)} tokens; the context holds {limit}',
                   'prompt')
  outside = [t for t in ids if not 0 <= t < served.vocab_size]
  if outside:
    raise APIError(400, f'prompt {index} holds token {outside[0]}, outside the vocabulary '
                   f'[0, {served.vocab_size})', 'prompt')


def budget(served: Served, prompt_len: int, asked: int | None, default: int | None) -> int:
  """New tokens a choice may draw: `asked`, else `default` (None: all the context leaves), within
  the context; the last token drawn is never run, so prompt + budget - 1 positions must fit."""
  room = served.engine.max_seq_len - prompt_len + 1
  if asked is None:
    return room if default is None else min(default, room)
  if asked > room:
    raise APIError(400, f'max_tokens={asked} does not fit: after a prompt of {prompt_len} '
                   f'tokens the context ({served.engine.max_seq_len}) holds {room} more',
                   'max_tokens')
  return asked


def served_models(served: Served) -> list[str]:
  """The base model's name, then each adapter's (the engine's adapter names)."""
  return [served.name, *served.engine.adapter_names]


def check_model(served: Served, model: str | None) -> None:
  if model is not None and model not in served_models(served):
    raise APIError(404, f'the model {model!r} does not exist; this server serves '
                   f'{served_models(served)}', 'model')


def adapter_of(served: Served, model: str | None) -> str | None:
  """The engine's adapter for a request's `model` (None: the base)."""
  return None if model in (None, served.name) else model


def stops(stop: str | list[str] | None) -> list[str]:
  return [stop] if isinstance(stop, str) else list(stop or [])


# --- one choice through the engine --------------------------------------------------------------

@dataclasses.dataclass
class Delta:
  """What one choice adds: text, the tokens behind it, and at the end its finish reason."""
  index: int
  text: str = ''
  tokens: list = dataclasses.field(default_factory=list)  # engine.Token, stop ids left out
  prompt: engine_lib.Prompt | None = None
  finish_reason: str | None = None
  drawn: int = 0  # Tokens the engine drew for this delta, stop ids included (usage).


async def run_choice(served: Served, request_kw: dict, prompt_ids: list[int], stop: list[str],
                     index: int, arrived: float) -> AsyncIterator[Delta]:
  """The deltas of one choice, as the engine draws its tokens; cancels it if abandoned."""
  loop = asyncio.get_running_loop()
  events: asyncio.Queue = asyncio.Queue()
  request = engine_lib.Request(
      prompt_ids, emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
      **request_kw)
  try:
    served.engine.submit(request)
  except (engine_lib.QueueFull, engine_lib.Stopped) as e:
    raise APIError(503, str(e)) from None
  text = detokenize.TextStream(served.tokenizer, prompt_ids, stop)
  last = None
  try:
    while True:
      event = await events.get()
      if isinstance(event, engine_lib.Prompt):
        yield Delta(index, prompt=event)
      elif isinstance(event, engine_lib.Token):
        now = time.perf_counter()
        if last is None:
          served.metrics.time_to_first_token.observe(now - arrived)
        else:
          served.metrics.inter_token_latency.observe(now - last)
        last = now
        served.metrics.generation_tokens.inc()
        if event.id in served.stop_ids:  # Always the last token: its text is none.
          yield Delta(index, drawn=1)
          continue
        piece = text.add(event.id)
        if text.stopped:
          request.cancel()
          yield Delta(index, piece, [event], finish_reason='stop', drawn=1)
          return
        yield Delta(index, piece, [event], drawn=1)
      elif event.error is not None:
        raise APIError(500, f'generation failed: {event.error}')
      elif event.reason == 'cancelled':  # Not by us: we stop reading when we cancel.
        raise APIError(503, 'the server stopped before the request finished')
      else:
        served.metrics.request_latency.observe(time.perf_counter() - arrived)
        reason = 'stop' if event.reason == 'stop' or text.stopped else 'length'
        yield Delta(index, text.finish(), finish_reason=reason)
        return
  finally:
    request.cancel()  # A no-op once the engine is done with it.


async def merged(iterators: list[AsyncIterator[Delta]]) -> AsyncIterator[Delta]:
  """Deltas of several choices as they come; closes them all if the consumer stops."""
  queue: asyncio.Queue = asyncio.Queue()

  async def pump(iterator):
    try:
      async for delta in iterator:
        await queue.put(delta)
      await queue.put(None)
    except Exception as e:  # pylint: disable=broad-except  (handed to the consumer)
      await queue.put(e)

  tasks = [asyncio.ensure_future(pump(it)) for it in iterators]
  try:
    for _ in range(len(tasks)):
      while (item := await queue.get()) is not None:
        if isinstance(item, Exception):
          raise item
        yield item
  finally:
    for task in tasks:
      task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnected(request: fastapi.Request) -> None:
  """Returns when the client goes away (the body has been read: the next message is that)."""
  while (await request.receive())['type'] != 'http.disconnect':
    pass


async def gather_or_cancel(request: fastapi.Request,
                           deltas: AsyncIterator[Delta]) -> list[Delta] | None:
  """Every delta, or None (and every choice cancelled) if the client disconnects first."""
  async def collect():
    return [delta async for delta in deltas]

  work = asyncio.ensure_future(collect())
  watch = asyncio.ensure_future(until_disconnected(request))
  done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
  watch.cancel()
  if work in done:
    return work.result()
  work.cancel()
  await asyncio.gather(work, return_exceptions=True)
  await deltas.aclose()
  return None


def sse(data: dict | str) -> str:
  return f'data: {data if isinstance(data, str) else json.dumps(data)}\n\n'


# --- logprobs in OpenAI's shapes ----------------------------------------------------------------

class CompletionLogprobs:
  """A completion choice's `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""

  def __init__(self, served: Served, num_top: int):
    self.tokenizer, self.num_top = served.tokenizer, num_top
    self.value = {'tokens': [], 'token_logprobs': [], 'top_logprobs': [], 'text_offset': []}
    self.offset = 0

  def top(self, ids: Sequence[int], logprobs: Sequence[float]) -> dict:
    alternatives = {}
    for token, logprob in list(zip(ids, logprobs))[:self.num_top]:
      alternatives.setdefault(self.tokenizer.decode([token]), logprob)  # Same text: likelier.
    return alternatives

  def add(self, token: int, logprob: float | None, top: dict | None, text: str) -> None:
    for key, value in (('tokens', self.tokenizer.decode([token])), ('token_logprobs', logprob),
                       ('top_logprobs', top), ('text_offset', self.offset)):
      self.value[key].append(value)
    self.offset += len(text)

  def add_prompt(self, prompt_ids: Sequence[int], scores: engine_lib.Prompt) -> None:
    """The echoed prompt's tokens: the first has no log-prob (nothing predicts it)."""
    pieces = detokenize.Detokenizer(self.tokenizer)
    for position, token in enumerate(prompt_ids):
      piece = pieces.add(token) + (pieces.flush() if position == len(prompt_ids) - 1 else '')
      if position == 0:
        self.add(token, None, None, piece)
      else:
        self.add(token, scores.logprobs[position - 1],
                 self.top(scores.top_ids[position - 1], scores.top_logprobs[position - 1]), piece)

  def add_tokens(self, delta: Delta) -> None:
    for i, token in enumerate(delta.tokens):
      self.add(token.id, token.logprob, self.top(token.top_ids, token.top_logprobs),
               delta.text if i == len(delta.tokens) - 1 else '')

  def take(self) -> dict:
    """What was added since the last take (a stream chunk's logprobs)."""
    value = self.value
    self.value = {key: [] for key in value}
    return value


def chat_logprobs(served: Served, tokens: Sequence, num_top: int) -> list[dict]:
  """Chat's `logprobs.content`: one entry per token, with its top alternatives."""
  entry = lambda token, logprob: {'token': (text := served.tokenizer.decode([token])),
                                  'logprob': logprob, 'bytes': list(text.encode('utf-8'))}
  return [{**entry(t.id, t.logprob),
           'top_logprobs': [entry(i, lp) for i, lp in zip(t.top_ids[:num_top],
                                                          t.top_logprobs[:num_top])]}
          for t in tokens]


# --- the app ------------------------------------------------------------------------------------

class Guard:
  """ASGI middleware: counts answers by endpoint and status, and refuses bodies over the limit."""

  def __init__(self, app, served: Served):
    self.app, self.served = app, served

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    limit, path = self.served.max_body_bytes, scope['path']
    status = [500]

    async def counted_send(message):
      if message['type'] == 'http.response.start':
        status[0] = message['status']
      await send(message)

    length = dict(scope['headers']).get(b'content-length')
    try:
      if length is not None and length.isdigit() and int(length) > limit:
        response = APIError(413, f'the body has {int(length)} bytes; the limit is {limit}')
        return await response.response()(scope, receive, counted_send)
      received = [0]

      async def limited_receive():
        message = await receive()
        received[0] += len(message.get('body', b''))
        if received[0] > limit:
          raise APIError(413, f'the body is over the limit of {limit} bytes')
        return message

      await self.app(scope, limited_receive, counted_send)
    finally:
      endpoint = path if path in ENDPOINTS else 'other'
      self.served.metrics.requests.labels(endpoint, str(status[0])).inc()


ENDPOINTS = ('/v1/completions', '/v1/chat/completions', '/v1/models', '/health', '/metrics',
             '/tokenize', '/detokenize', '/tokenizer_info')


def create_app(served: Served) -> fastapi.FastAPI:
  """The FastAPI app over `served` (the engine started and stopped by the caller)."""
  app = fastapi.FastAPI(title='lepton-serve', docs_url=None, redoc_url=None, openapi_url=None)

  @app.exception_handler(APIError)
  async def api_error(_, error: APIError):
    return error.response()

  @app.exception_handler(fastapi.HTTPException)
  @app.exception_handler(404)
  @app.exception_handler(405)
  async def http_error(request, error):
    status = getattr(error, 'status_code', 404)
    message = getattr(error, 'detail', None) or 'not found'
    return APIError(status, f'{request.method} {request.url.path}: {message}').response()

  @app.exception_handler(Exception)
  async def internal_error(_, error: Exception):
    return APIError(500, f'{type(error).__name__}: {error}').response()

  def authorized(request: fastapi.Request) -> None:
    if served.api_key is None:
      return
    header = request.headers.get('authorization', '')
    if not secrets.compare_digest(header.encode(), f'Bearer {served.api_key}'.encode()):
      raise APIError(401, 'a valid API key is required: send Authorization: Bearer KEY')

  guarded = [fastapi.Depends(authorized)]

  @app.get('/health')
  async def health():
    if served.engine.failed:
      return APIError(503, f'the engine failed: {served.engine.failed}').response()
    return {'status': 'ok', 'running': served.engine.running,
            'waiting': served.engine.queue_depth}

  @app.get('/metrics', dependencies=guarded)
  async def metrics():
    body, content_type = served.metrics.exposition()
    return responses.Response(body, media_type=content_type)

  @app.get('/v1/models', dependencies=guarded)
  async def models():
    return {'object': 'list', 'data': [
        {'id': name, 'object': 'model', 'created': served.created, 'owned_by': 'lepton_jax',
         'max_model_len': served.engine.max_seq_len,
         **({'parent': served.name} if name != served.name else {})}
        for name in served_models(served)]}

  @app.get('/tokenizer_info', dependencies=guarded)
  async def tokenizer_info():
    return {**served.tokenizer_info, 'model_max_length': served.engine.max_seq_len}

  @app.post('/tokenize', dependencies=guarded)
  async def tokenize(request: fastapi.Request):
    body = parse(TokenizeBody, await request.body())
    check_model(served, body.model)
    if (body.prompt is None) == (body.messages is None):
      raise APIError(400, 'give one of prompt and messages', 'prompt')
    if body.messages is not None:
      ids = chat_ids(served, body.messages, body.add_generation_prompt)
    else:
      ids = text_ids(served, body.prompt) if body.add_special_tokens else \
          served.tokenizer.encode(body.prompt)
    return {'count': len(ids), 'max_model_len': served.engine.max_seq_len, 'tokens': ids,
            'token_strs': None}

  @app.post('/detokenize', dependencies=guarded)
  async def detokenize_(request: fastapi.Request):
    body = parse(DetokenizeBody, await request.body())
    check_model(served, body.model)
    check_prompt(served, body.tokens or [0], 0)
    return {'prompt': served.tokenizer.decode(body.tokens)}

  @app.post('/v1/completions', dependencies=guarded)
  async def completions(request: fastapi.Request):
    arrived = time.perf_counter()
    body = parse(CompletionBody, await request.body())
    check_model(served, body.model)
    check_sampling(body, served.engine.max_batch)
    if body.logprobs is not None and not 0 <= body.logprobs <= engine_lib.MAX_TOP:
      raise APIError(400, f'logprobs={body.logprobs}: must be in [0, {engine_lib.MAX_TOP}]',
                     'logprobs')
    prompts = completion_prompts(served, body.prompt)
    choices = []
    for p, (text, ids) in enumerate(prompts):
      check_prompt(served, ids, p)
      max_new = budget(served, len(ids), body.max_tokens, 16)
      for j in range(body.n):
        choices.append((text, ids, max_new, p * body.n + j, j))
    return await respond(request, served, body, choices, arrived, chat=False)

  @app.post('/v1/chat/completions', dependencies=guarded)
  async def chat_completions(request: fastapi.Request):
    arrived = time.perf_counter()
    body = parse(ChatBody, await request.body())
    check_model(served, body.model)
    check_sampling(body, served.engine.max_batch)
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= engine_lib.MAX_TOP:
      raise APIError(400, f'top_logprobs={body.top_logprobs}: must be in '
                     f'[0, {engine_lib.MAX_TOP}]', 'top_logprobs')
    ids = chat_ids(served, body.messages, add_generation_prompt=True)
    check_prompt(served, ids, 0)
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else \
        body.max_tokens
    max_new = budget(served, len(ids), asked, None)
    if max_new < 1:
      raise APIError(400, 'max_tokens must be at least 1 for a chat completion', 'max_tokens')
    choices = [('', ids, max_new, j, j) for j in range(body.n)]
    return await respond(request, served, body, choices, arrived, chat=True)

  return Guard(app, served)


def text_ids(served: Served, text: str) -> list[int]:
  return [scoring.prefix_id(served.tokenizer)] + served.tokenizer.encode(text)


def completion_prompts(served: Served, prompt) -> list[tuple[str | None, list[int]]]:
  """(text as given or None, ids) of each prompt of a completions request."""
  if isinstance(prompt, str):
    return [(prompt, text_ids(served, prompt))]
  if not prompt:
    raise APIError(400, 'prompt is an empty list', 'prompt')
  if isinstance(prompt[0], int):
    return [(None, list(prompt))]
  if isinstance(prompt[0], str):
    return [(text, text_ids(served, text)) for text in prompt]
  return [(None, list(ids)) for ids in prompt]


def chat_ids(served: Served, messages: list[dict], add_generation_prompt: bool) -> list[int]:
  if served.chat is None:
    raise APIError(400, served.chat_error, 'messages')
  messages = [dict(m, content=text_of(m.get('content'))) for m in messages]
  try:
    return served.chat(messages, add_generation_prompt)
  except ValueError as e:
    raise APIError(400, str(e), 'messages') from None


def text_of(content):
  """A message's content: a string, or OpenAI's list of text parts joined."""
  if isinstance(content, list):
    if not all(isinstance(p, dict) and p.get('type') == 'text' for p in content):
      raise APIError(400, 'message content parts must all be {"type": "text", "text": ...}',
                     'messages')
    return ''.join(str(p.get('text', '')) for p in content)
  return content


async def respond(request: fastapi.Request, served: Served, body: Sampling, choices: list,
                  arrived: float, chat: bool):
  """Runs every choice through the engine; answers whole or as server-sent events."""
  stop = stops(body.stop)
  if len(choices) > served.engine.max_queue:
    raise APIError(400, f'{len(choices)} choices (prompts x n) exceed the queue '
                   f'({served.engine.max_queue})', 'n')
  # Refused before any answer starts, so that a stream too gets its status (later refusals, when
  # others filled the queue meanwhile, end the stream with an error event).
  if not served.engine.admitting:
    raise APIError(503, 'the server is shutting down and admits no new requests')
  if served.engine.queue_depth + len(choices) > served.engine.max_queue:
    raise APIError(503, f'{served.engine.queue_depth} requests are already waiting; retry later')
  echo = not chat and body.echo
  num_top = (body.top_logprobs or 0) if chat else (body.logprobs or 0)
  wants_logprobs = body.logprobs if chat else body.logprobs is not None
  iterators = [run_choice(served, dict(
      max_new=max_new, temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
      min_p=body.min_p, seed=body.seed, index=j, score_prompt=echo and wants_logprobs,
      adapter=adapter_of(served, body.model)),
      ids, stop, index, arrived) for _, ids, max_new, index, j in choices]
  prompt_tokens = sum(len(ids) for _, ids, _, index, j in choices if j == 0)
  served.metrics.prompt_tokens.inc(prompt_tokens)
  rid = f'{"chatcmpl" if chat else "cmpl"}-{secrets.token_hex(12)}'
  head = {'id': rid, 'object': 'chat.completion' if chat else 'text_completion',
          'created': int(time.time()), 'model': body.model or served.name}
  prompts = {index: (text, ids) for text, ids, _, index, _ in choices}
  usage = lambda drawn: {'prompt_tokens': prompt_tokens, 'completion_tokens': drawn,
                         'total_tokens': prompt_tokens + drawn}
  if body.stream:
    return responses.StreamingResponse(
        stream(served, head, merged(iterators), prompts, echo, wants_logprobs, num_top, chat,
               usage if body.stream_options and body.stream_options.include_usage else None),
        media_type='text/event-stream')
  deltas = await gather_or_cancel(request, merged(iterators))
  if deltas is None:
    return responses.Response(status_code=499)  # nginx's "client closed request": none reads it.
  return whole(served, head, deltas, prompts, echo, wants_logprobs, num_top, chat, usage)


def echo_text(served: Served, text: str | None, ids: list[int]) -> str:
  return text if text is not None else served.tokenizer.decode(ids)


def whole(served, head, deltas, prompts, echo, wants_logprobs, num_top, chat, usage) -> dict:
  """The unstreamed response: each choice's deltas joined."""
  by_index = {index: [] for index in sorted(prompts)}
  for delta in deltas:
    by_index[delta.index].append(delta)
  out = []
  for index, parts in by_index.items():
    text = ''.join(d.text for d in parts)
    tokens = [t for d in parts for t in d.tokens]
    reason = next(d.finish_reason for d in parts if d.finish_reason)
    if chat:
      choice = {'index': index, 'message': {'role': 'assistant', 'content': text},
                'logprobs': {'content': chat_logprobs(served, tokens, num_top)}
                if wants_logprobs else None, 'finish_reason': reason}
    else:
      logprobs = None
      if wants_logprobs:
        logprobs = CompletionLogprobs(served, num_top)
        if echo:
          scores = next((d.prompt for d in parts if d.prompt is not None), None)
          logprobs.add_prompt(prompts[index][1], scores)
        for d in parts:
          logprobs.add_tokens(d)
        logprobs = logprobs.value
      prefix = echo_text(served, *prompts[index]) if echo else ''
      choice = {'index': index, 'text': prefix + text, 'logprobs': logprobs,
                'finish_reason': reason}
    out.append(choice)
  return {**head, 'choices': out, 'usage': usage(sum(d.drawn for d in deltas))}


async def stream(served, head, deltas, prompts, echo, wants_logprobs, num_top, chat,
                 usage) -> AsyncIterator[str]:
  """Server-sent events: a chunk per delta, the usage chunk if asked, then [DONE]."""
  head = {**head, 'object': 'chat.completion.chunk' if chat else 'text_completion'}
  extra = {'usage': None} if usage else {}
  logprobs = {index: CompletionLogprobs(served, num_top) for index in prompts}
  started, drawn = set(), 0
  try:
    if chat:
      for index in prompts:
        yield sse({**head, 'choices': [{'index': index, 'delta': {'role': 'assistant',
                                                                   'content': ''},
                                        'logprobs': None, 'finish_reason': None}], **extra})
    async for delta in deltas:
      drawn += delta.drawn
      if chat:
        if not (delta.text or delta.finish_reason):
          continue
        choice = {'index': delta.index, 'delta': {'content': delta.text} if delta.text else {},
                  'logprobs': {'content': chat_logprobs(served, delta.tokens, num_top)}
                  if wants_logprobs else None, 'finish_reason': delta.finish_reason}
      else:
        text, log = delta.text, logprobs[delta.index]
        if echo and delta.index not in started:  # The prompt leads the choice's first chunk.
          text = echo_text(served, *prompts[delta.index]) + text
          if wants_logprobs:
            log.add_prompt(prompts[delta.index][1], delta.prompt)
        started.add(delta.index)
        if wants_logprobs:
          log.add_tokens(delta)
        if not (text or delta.finish_reason or delta.tokens):
          continue
        choice = {'index': delta.index, 'text': text,
                  'logprobs': log.take() if wants_logprobs else None,
                  'finish_reason': delta.finish_reason}
      yield sse({**head, 'choices': [choice], **extra})
    if usage:
      yield sse({**head, 'choices': [], 'usage': usage(drawn)})
  except APIError as e:
    yield sse(error_body(e.status, e.message, e.param))
  finally:
    await deltas.aclose()
  yield sse('[DONE]')
