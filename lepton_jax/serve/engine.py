"""Continuous batching over generate's prefill, insert and decode_step, in one thread.

  engine = Engine(model, variables, stop_ids=tokenizer.eos_ids, max_batch=16)
  engine.start()                        # compiles every prefill bucket and the decode step
  engine.submit(Request(prompt=[1, 5, 9], max_new=20, emit=print))
  engine.stop()

The engine thread owns the devices: it is the only one that runs the model. Between two decode
steps it takes waiting requests from a bounded queue into free slots (a prefill of the prompt,
right-padded to a power-of-two bucket, then `generate.insert` into the slot), and after each step
it hands every running slot's new token to its request's `emit` and frees the slots that ended:
a long generation never holds up a short one. Every slot has its own position, budget, sampling
settings and key, so a request draws the same tokens whoever shares the batch with it.

Everything is compiled before the first request (`start`): prefill and prompt scoring once per
bucket, insert and the decode step once; traffic of any shape compiles nothing more.

With `adapters` (LoRA adapters over the model's base, by name) each request names its adapter
(None: the base). Its prompt is prefilled with that adapter, and the decode step's batch mixes
them: each row applies its own adapter (lora.per_row), as punica and S-LoRA do, so a request
never waits for others of its adapter.
"""
import dataclasses
import functools
import logging
import os
import queue
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax import generate, lora, sharding, train_state, tree
from lepton_jax.model import Transformer

MAX_TOP = 5  # The most alternatives a token's logprobs may list (OpenAI's completions limit).


@dataclasses.dataclass
class Token:
  """One drawn token of a request, with its log-prob and the MAX_TOP most likely tokens."""
  id: int
  logprob: float
  top_ids: list[int]
  top_logprobs: list[float]


@dataclasses.dataclass
class Prompt:
  """An echo request's prompt scores: each token after the first, given those before it."""
  logprobs: list[float]
  top_ids: list[list[int]]
  top_logprobs: list[list[float]]


@dataclasses.dataclass
class Finished:
  """The request ended: reason 'stop' (its last token is a stop id), 'length' (its budget) or
  'cancelled'; or it failed with `error`."""
  reason: str
  error: str | None = None


Event = Token | Prompt | Finished


@dataclasses.dataclass(eq=False)
class Request:
  """A prompt and how to continue it. `emit` is called from the engine thread with every Event,
  Finished last; `cancel()` frees its slot at the next step."""
  prompt: Sequence[int]
  max_new: int  # 0: no new tokens (with score_prompt, only the prompt's log-probs).
  emit: Callable[[Event], None]
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  seed: int | None = None  # None: a fresh random seed.
  index: int = 0  # Draws from fold_in(key(seed), index), as row `index` of generate.generate.
  adapter: str | None = None  # One of the engine's adapters; None: the base model.
  score_prompt: bool = False
  submitted: float = dataclasses.field(default_factory=time.perf_counter)
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

  def cancel(self) -> None:
    self.cancelled.set()


class QueueFull(Exception):
  """The bounded queue of waiting requests is full: try again later (HTTP 503)."""


class Stopped(Exception):
  """The engine admits nothing more: it is draining or stopped (HTTP 503)."""


@functools.partial(jax.jit, static_argnames='model', donate_argnames='state')
def mixed_decode_step(model: Transformer, base, stacked, adapter_ids_B: jax.Array,
                      state: generate.DecodeState, stop_ids: jax.Array) -> generate.DecodeState:
  """generate.decode_step with row b adapted by adapter adapter_ids_B[b] of `stacked`."""
  variables = dict(base, **lora.per_row(model.cfg, stacked, adapter_ids_B))
  return generate.decode_step(model, variables, state, stop_ids)


def buckets(max_len: int) -> list[int]:
  """The padded prompt lengths: powers of two from 16, and max_len itself."""
  return sorted({generate.bucket(n, max_len) for n in [1] + [1 << k for k in range(4, 31)]
                 if n <= max_len} | {max_len})


class Engine:
  """`max_batch` decode slots over one model, on `mesh` (default: the first device).

  The mesh may split the model over `tensor`, but not the batch (data, fsdp): one request is
  prefilled at a time into its own slot. Run a server per replica for data parallelism.
  """

  def __init__(self, model: Transformer, variables: dict, stop_ids: Sequence[int], *,
               max_batch: int = 8, max_seq_len: int | None = None, max_queue: int = 256,
               mesh: jax.sharding.Mesh | None = None, rules=None,
               adapters: dict[str, dict] | None = None):
    cfg = model.cfg
    # A request's own positions: prompt tuning's virtual tokens take the first ones.
    self.max_seq_len = min(max_seq_len or cfg.max_seq_len,
                           cfg.max_seq_len - cfg.peft.virtual_tokens)
    if max_batch < 1:
      raise ValueError(f'max_batch={max_batch}: must be at least 1')
    self.model, self.max_batch = model, max_batch
    if mesh is None:
      mesh = jax.make_mesh((1,) * len(sharding.MESH_AXES), sharding.MESH_AXES,
                           devices=jax.devices()[:1],
                           axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES))
    from lepton_jax import config_lib  # pylint: disable=g-import-not-at-top
    self.mesh, self.rules = mesh, list(rules if rules is not None else config_lib.DEFAULT_RULES)
    with sharding.use_mesh(self.mesh, self.rules):
      if generate.batch_multiple() != 1:
        raise ValueError('the server splits the batch over no mesh axis: set '
                         '--config.mesh.data=1 --config.mesh.fsdp=1 (split the model with '
                         '--config.mesh.tensor) and run a server per replica')
      shardings = train_state.abstract_variables(model, self.mesh, self.rules, 8)[1]
      self.variables = jax.device_put(variables, tree.select(shardings, variables))
      # Each adapter laid out as its params are here (a loaded run's are on the run's mesh).
      self._set_adapters({name: jax.device_put(adapter, tree.select(shardings['params'], adapter))
                          for name, adapter in (adapters or {}).items()})
    self.cache_len = generate.cache_length(cfg, self.max_seq_len + cfg.peft.virtual_tokens)
    self.buckets = buckets(self.max_seq_len)
    self.stops = generate.stop_array(sorted(set(stop_ids)))
    self._stop_set = set(stop_ids)
    self._queue = queue.Queue(max_queue)
    self._slots: list[Request | None] = [None] * max_batch
    self._emitted = np.zeros(max_batch, np.int64)  # New tokens handed to each slot's request.
    self._state = None
    self._thread = None
    self._admitting = True
    self._running = False
    self.failed = None  # Why the engine thread ended, if it failed.

  def _set_adapters(self, adapters: dict[str, dict]) -> None:
    """The variables of each adapter for prefill, and all of them stacked for the decode step
    (index 0: the base, an adapter whose B is zero)."""
    self.adapter_names = list(adapters)
    self._adapter_ids_B = np.zeros(self.max_batch, np.int32)
    if not adapters:
      self._stacked, self._variables_of = None, {None: self.variables}
      return
    if not self.model.cfg.lora.enabled:
      raise ValueError('adapters need a model with config.lora (their targets and rank)')
    adapter_set = lora.AdapterSet(self.variables)
    for name, adapter in adapters.items():
      adapter_set.add(name, adapter)
    zero = jax.tree.map(jnp.zeros_like, next(iter(adapters.values())))
    self._stacked = jax.device_put(lora.stack([zero, *adapters.values()]),
                                   sharding.replicated(self.mesh))
    self._variables_of = {None: dict(adapter_set.base,
                                     params=tree.merge(adapter_set.base['params'], zero))}
    self._variables_of.update({name: adapter_set.variables(name) for name in adapters})
    self._base = adapter_set.base

  # --- the outside: any thread ----------------------------------------------------------------

  def start(self) -> None:
    """Compiles every shape, then starts the engine thread."""
    with sharding.use_mesh(self.mesh, self.rules):
      self._warm_up()
    self._running = True
    self._thread = threading.Thread(target=self._loop, name='lepton-engine', daemon=True)
    self._thread.start()

  def submit(self, request: Request) -> None:
    """Queues `request`; raises QueueFull or Stopped. Validation is the caller's (api.py)."""
    if request.adapter not in self._variables_of:
      raise ValueError(f'no adapter named {request.adapter!r}; loaded: {self.adapter_names}')
    if not self._admitting:
      raise Stopped('the server is shutting down and admits no new requests')
    try:
      self._queue.put_nowait(request)
    except queue.Full:
      raise QueueFull(f'{self._queue.maxsize} requests are already waiting; retry later') from None

  def drain(self) -> None:
    """Admits nothing more; queued and running requests finish."""
    self._admitting = False

  def stop(self) -> None:
    """Ends the engine thread; unfinished requests end with reason 'cancelled'."""
    self._admitting = self._running = False
    if self._thread is not None:
      self._thread.join()
    while not self._queue.empty():
      self._queue.get_nowait().emit(Finished('cancelled'))
    for slot, request in enumerate(self._slots):
      if request is not None:
        self._slots[slot] = None
        request.emit(Finished('cancelled'))

  @property
  def admitting(self) -> bool:
    return self._admitting

  @property
  def max_queue(self) -> int:
    return self._queue.maxsize

  @property
  def queue_depth(self) -> int:
    return self._queue.qsize()

  @property
  def running(self) -> int:
    return sum(r is not None for r in self._slots)

  @property
  def idle(self) -> bool:
    return self.running == 0 and self._queue.empty()

  # --- the engine thread ----------------------------------------------------------------------

  def _warm_up(self) -> None:
    """Runs every compiled shape once: each bucket's prefill and scoring, insert, decode_step."""
    for length in self.buckets:
      dummy = Request([0] * length, max_new=1, emit=lambda event: None, seed=0)
      rows = self._prefill(dummy)
      self._score(dummy)
    # Every slot free: one-token prompts that end at once.
    tokens_BT, lengths_B = generate.pad_prompts([[0]] * self.max_batch, self.max_batch, 16)
    self._state = generate.prefill(
        self.model, self._variables_of[None], tokens_BT, lengths_B, self.cache_len,
        generate.sampling(self.max_batch), np.ones(self.max_batch, np.int32), self.stops, MAX_TOP)
    self._state = generate.insert(self._state, rows, 0)
    self._state = self._decode_step()
    jax.block_until_ready(self._state)

  def _loop(self) -> None:
    with sharding.use_mesh(self.mesh, self.rules):
      try:
        while self._running:
          self._admit(block=self.running == 0)
          if self.running:
            self._step()
      except Exception as e:  # pylint: disable=broad-except  (the device state is lost)
        logging.exception('lepton-serve: the engine failed')
        self.failed = f'{type(e).__name__}: {e}'
        self._admitting = False
        for slot, request in enumerate(self._slots):
          if request is not None:
            self._slots[slot] = None
            request.emit(Finished('error', error=self.failed))

  def _admit(self, block: bool) -> None:
    """Takes waiting requests into free slots; waits a little for one when nothing runs."""
    for slot in range(self.max_batch):
      if self._slots[slot] is not None:
        continue
      try:
        request = self._queue.get(timeout=0.05) if block else self._queue.get_nowait()
      except queue.Empty:
        return
      block = False
      if request.cancelled.is_set():
        request.emit(Finished('cancelled'))
        continue
      try:
        if request.score_prompt:
          request.emit(self._score(request))
        if request.max_new == 0:
          request.emit(Finished('length'))
          continue
        rows = self._prefill(request)
        self._state = generate.insert(self._state, rows, slot)
        if self._stacked is not None:
          self._adapter_ids_B[slot] = 1 + self.adapter_names.index(request.adapter) \
              if request.adapter is not None else 0
      except Exception as e:  # pylint: disable=broad-except  (one request, never the engine)
        request.emit(Finished('error', error=f'{type(e).__name__}: {e}'))
        continue
      self._slots[slot], self._emitted[slot] = request, 0
      self._emit_new(slot, *self._host_rows(rows, 0))

  def _decode_step(self) -> generate.DecodeState:
    if self._stacked is None:
      return generate.decode_step(self.model, self.variables, self._state, self.stops)
    return mixed_decode_step(self.model, self._base, self._stacked,
                             jnp.asarray(self._adapter_ids_B), self._state, self.stops)

  def _step(self) -> None:
    self._state = self._decode_step()
    host = self._host_rows(self._state, slice(None))
    for slot, request in enumerate(self._slots):
      if request is not None:
        self._emit_new(slot, *(x[slot] for x in host))

  @staticmethod
  def _host_rows(state: generate.DecodeState, rows):
    """(token, num_new, done, logprob, top ids, top logprobs) of `rows`, on the host."""
    fields = jax.device_get((state.tokens_B, state.num_new_B, state.done_B, state.logprob_B,
                             state.top_ids_BR, state.top_logprobs_BR))
    return tuple(np.asarray(x)[rows] for x in fields)

  def _emit_new(self, slot, token, num_new, done, logprob, top_ids, top_logprobs) -> None:
    """Hands the slot's new token to its request and frees the slot when the row has ended."""
    request = self._slots[slot]
    if request.cancelled.is_set():
      self._slots[slot] = None
      request.emit(Finished('cancelled'))
      return
    if num_new > self._emitted[slot]:
      self._emitted[slot] = num_new
      request.emit(Token(int(token), float(logprob), top_ids.tolist(), top_logprobs.tolist()))
    if done:
      self._slots[slot] = None
      request.emit(Finished('stop' if int(token) in self._stop_set else 'length'))

  def _settings(self, request: Request) -> generate.Sampling:
    seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(4), 'little')
    settings = generate.sampling(1, request.temperature, request.top_k, request.top_p,
                                 request.min_p)
    key = jax.random.fold_in(jax.random.key(seed % 2**32), request.index)
    return settings.replace(keys_B=key[None])

  def _prefill(self, request: Request) -> generate.DecodeState:
    tokens_BT, lengths_B = generate.pad_prompts(
        [request.prompt], 1, generate.bucket(len(request.prompt), self.max_seq_len))
    return generate.prefill(self.model, self._variables_of[request.adapter], tokens_BT,
                            lengths_B, self.cache_len,
                            self._settings(request), np.array([request.max_new], np.int32),
                            self.stops, MAX_TOP)

  def _score(self, request: Request) -> Prompt:
    tokens_BT, _ = generate.pad_prompts(
        [request.prompt], 1, generate.bucket(len(request.prompt), self.max_seq_len))
    logprob_BT, ids_BTR, top_BTR = jax.device_get(
        generate.prompt_logprobs(self.model, self._variables_of[request.adapter], tokens_BT,
                                 MAX_TOP))
    n = len(request.prompt) - 1
    return Prompt(logprob_BT[0, :n].tolist(), ids_BTR[0, :n].tolist(), top_BTR[0, :n].tolist())
