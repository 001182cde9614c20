"""Generation with a KV cache: prefill, insert, one jitted decode loop, and sampling.

  from lepton_jax import generate
  new_tokens = generate.generate(model, variables, [[1, 5, 9], [1, 7]], max_new_tokens=20,
                                 temperature=0.8, top_p=0.95, seed=0, eos_id=tokenizer.eos_id)

Each row of a batch is a slot with its own position, budget, sampling settings and random key
(`DecodeState`). `generate` is `prefill` (one forward pass over the prompts fills the cache and
draws each row's first token) then `decode_loop` (a `lax.while_loop` of `decode_step`, compiled
once, until every row has stopped); a server calls `prefill`, `insert` (new requests into free
slots) and `decode_step` itself.

Prompts of unequal lengths are right-padded: every row's positions start at 0 and its padding
lies after its prompt, where causal attention never looks, so a row computes exactly what it would
alone. Inside `sharding.use_mesh` the cache is split by the model's logical axis rules (batch over
data and fsdp, kv heads over tensor).

Shape suffixes use the legend in lepton_jax/model/__init__.py (C: new tokens of a row; R: the
most likely tokens reported beside each drawn one, for a server's logprobs).
"""
import functools
from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax import lora, sharding
from lepton_jax.model import ModelConfig, Transformer, attention


@flax.struct.dataclass
class Sampling:
  """How each row draws its tokens: temperature 0 is greedy; top_k 0, top_p 1, min_p 0 are off."""
  temperature_B: jax.Array  # float32
  top_k_B: jax.Array  # int32
  top_p_B: jax.Array  # float32
  min_p_B: jax.Array  # float32
  keys_B: jax.Array  # A random key per row; its i-th new token is drawn with fold_in(key, i).


@flax.struct.dataclass
class DecodeState:
  """Every row (slot) of a batch being decoded."""
  cache: dict  # The model's `cache` collection (attention.py), boxed with its logical axes.
  tokens_B: jax.Array  # Each row's newest token: the next step's input, not yet in the cache.
  positions_B: jax.Array  # Its position, which is how many of the row's tokens the cache holds.
  num_new_B: jax.Array  # New tokens drawn so far, tokens_B included.
  max_new_B: jax.Array  # The most new tokens the row may draw.
  done_B: jax.Array  # Stopped: a stop token drawn or max_new_B reached (a free slot, to a server).
  sampling: Sampling
  # What a server reports as logprobs: under the model's own distribution (before temperature
  # and filtering), the log-prob of tokens_B and the R most likely tokens (R: prefill's num_top).
  logprob_B: jax.Array
  top_ids_BR: jax.Array
  top_logprobs_BR: jax.Array


def sampling(batch: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, seed: int = 0) -> Sampling:
  """The same settings for `batch` rows; row b draws from fold_in(key(seed), b)."""
  check_sampling(temperature, top_k, top_p, min_p)
  full = lambda value, dtype: jnp.full((batch,), value, dtype)
  keys_B = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(batch))
  return Sampling(full(temperature, jnp.float32), full(top_k, jnp.int32),
                  full(top_p, jnp.float32), full(min_p, jnp.float32), keys_B)


def check_sampling(temperature: float, top_k: int, top_p: float, min_p: float) -> None:
  if temperature < 0:
    raise ValueError(f'temperature={temperature}: must be >= 0 (0 is greedy)')
  if top_k < 0:
    raise ValueError(f'top_k={top_k}: must be >= 0 (0 keeps every token)')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p={top_p}: must be in (0, 1] (1 keeps every token)')
  if not 0 <= min_p <= 1:
    raise ValueError(f'min_p={min_p}: must be in [0, 1] (0 keeps every token)')


def check_prompts(cfg: ModelConfig, prompt_tokens: Sequence[Sequence[int]],
                  max_new_tokens: int) -> None:
  """Raises a one-line ValueError unless every prompt and its new tokens fit the model."""
  if not prompt_tokens:
    raise ValueError('prompt_tokens is empty: give at least one prompt (a list of token ids)')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens}: must be at least 1')
  for index, prompt in enumerate(prompt_tokens):
    if not prompt:
      raise ValueError(f'prompt {index} is empty: give at least one token (e.g. bos or eos)')
    if len(prompt) > cfg.max_seq_len:
      raise ValueError(f'prompt {index} has {len(prompt)} tokens; the model has positions for '
                       f'{cfg.max_seq_len} (max_seq_len)')
    outside = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if outside:
      raise ValueError(f'prompt {index} holds token {outside[0]}, outside the vocabulary '
                       f'[0, {cfg.vocab_size})')
  virtual = cfg.peft.virtual_tokens  # Prompt tuning's, before every prompt.
  longest = max(map(len, prompt_tokens)) + virtual
  # The last token drawn is never fed back: prompt + max_new_tokens - 1 positions are run.
  if longest + max_new_tokens - 1 > cfg.max_seq_len:
    raise ValueError(f'max_new_tokens={max_new_tokens} overflows the cache: after a prompt of '
                     f'{longest} tokens{f" ({virtual} of them virtual)" if virtual else ""} the '
                     'model has positions for '
                     f'{cfg.max_seq_len - longest + 1} more (max_seq_len={cfg.max_seq_len})')


def cache_length(cfg: ModelConfig, num_positions: int) -> int:
  """Slots a cache needs to run `num_positions` positions: a sliding window needs only its own."""
  return min(num_positions, cfg.sliding_window) if cfg.sliding_window else num_positions


# --- sampling -------------------------------------------------------------------------------

def top_k_top_p(logits_BV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
  """-inf outside each row's k largest logits, then outside the smallest set of those whose
  probability reaches top_p (transformers' order: top-k, then top-p over what it kept)."""
  vocab = logits_BV.shape[-1]
  descending_BV = -jnp.sort(-logits_BV, axis=-1)
  k_B1 = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, vocab), vocab)[:, None]
  kth_B1 = jnp.take_along_axis(descending_BV, k_B1 - 1, axis=-1)
  descending_BV = jnp.where(descending_BV >= kth_B1, descending_BV, -jnp.inf)
  probs_BV = jax.nn.softmax(descending_BV, axis=-1)
  in_nucleus_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p_B[:, None]  # Mass before.
  pth_B1 = jnp.min(jnp.where(in_nucleus_BV, descending_BV, jnp.inf), axis=-1, keepdims=True)
  threshold_B1 = jnp.where(top_p_B[:, None] < 1, jnp.maximum(kth_B1, pth_B1), kth_B1)
  return jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)


def filter_logits(logits_BV: jax.Array, settings: Sampling) -> jax.Array:
  """Temperature-scaled logits with -inf outside each row's top-k, top-p and min-p sets."""
  temperature_B1 = jnp.where(settings.temperature_B > 0, settings.temperature_B, 1.0)[:, None]
  logits_BV = logits_BV / temperature_B1
  # Sorting costs more than the rest of a small model's step: only when some row asks for it.
  logits_BV = jax.lax.cond(jnp.any((settings.top_k_B > 0) | (settings.top_p_B < 1)),
                           top_k_top_p, lambda x, *_: x, logits_BV, settings.top_k_B,
                           settings.top_p_B)
  # min-p keeps tokens with probability >= min_p * the top one's: a bound on the logit.
  floor_B1 = jnp.max(logits_BV, axis=-1, keepdims=True) + jnp.log(settings.min_p_B)[:, None]
  return jnp.where(logits_BV >= floor_B1, logits_BV, -jnp.inf)


def draw(logits_BV: jax.Array, settings: Sampling, steps_B: jax.Array) -> jax.Array:
  """Each row's next token: the argmax where its temperature is 0, else a sample with the row's
  key folded with `steps_B` (the index of the token among the row's new ones)."""
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

  def sample():
    keys_B = jax.vmap(jax.random.fold_in)(settings.keys_B, steps_B)
    filtered_BV = filter_logits(logits_BV, settings)
    return jax.vmap(jax.random.categorical)(keys_B, filtered_BV).astype(jnp.int32)

  sampled_B = settings.temperature_B > 0
  drawn_B = jax.lax.cond(jnp.any(sampled_B), sample, lambda: greedy_B)
  return jnp.where(sampled_B, drawn_B, greedy_B)


def token_logprobs(logits_BTV: jax.Array, tokens_BT: jax.Array,
                   num_top: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(log-prob of each token [B, T], the num_top most likely ids [B, T, R] and their log-probs)
  under the softmax of the logits that predict them."""
  logprobs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  chosen_BT = jnp.take_along_axis(logprobs_BTV, tokens_BT[..., None], axis=-1)[..., 0]
  if not num_top:
    empty = jnp.zeros((*tokens_BT.shape, 0))
    return chosen_BT, empty.astype(jnp.int32), empty
  top_BTR, ids_BTR = jax.lax.top_k(logprobs_BTV, num_top)
  return chosen_BT, ids_BTR.astype(jnp.int32), top_BTR


@functools.partial(jax.jit, static_argnames=('model', 'num_top'))
def prompt_logprobs(model: Transformer, variables, tokens_BT: jax.Array,
                    num_top: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`token_logprobs` of every prompt token after the first, given the tokens before it: [B, T-1]
  (and [B, T-1, R]); padding after a row's prompt is never seen by the positions before it."""
  logits_BTV = model.apply(variables, tokens_BT)
  return token_logprobs(logits_BTV[:, :-1], tokens_BT[:, 1:], num_top)


# --- prefill, insert, decode ----------------------------------------------------------------

def stop_array(stop_ids: Sequence[int]) -> np.ndarray:
  """The ids that end a row as a 1-D int32 array, padded with -1 (no token) to a multiple of 8,
  so that how many there are rarely changes the compiled shapes."""
  stops = np.full(-(-max(len(stop_ids), 1) // 8) * 8, -1, np.int32)
  stops[:len(stop_ids)] = stop_ids
  return stops


def is_stop(tokens_B: jax.Array, stop_ids: jax.Array) -> jax.Array:
  """[B] bool: which tokens are among `stop_ids` (from stop_array)."""
  return jnp.any(tokens_B[:, None] == stop_ids[None, :], axis=-1)


@functools.partial(jax.jit, static_argnames=('model', 'cache_len', 'num_top'))
def prefill(model: Transformer, variables, tokens_BT: jax.Array, lengths_B: jax.Array,
            cache_len: int, settings: Sampling, max_new_B: jax.Array,
            stop_ids: jax.Array, num_top: int = 0) -> DecodeState:
  """Rows ready to decode: right-padded prompts (row b's first lengths_B[b] tokens) run in one
  pass that fills a cache of `cache_len` slots, and each row's first new token drawn; every step
  also reports the `num_top` most likely tokens."""
  logits_B1V, mutated = model.apply(variables, tokens_BT,
                                    cache=attention.Prefill(lengths_B, cache_len),
                                    mutable=['cache'])
  first_B = draw(logits_B1V[:, 0], settings, jnp.zeros_like(lengths_B))
  logprob_B1, top_ids_B1R, top_logprobs_B1R = token_logprobs(logits_B1V, first_B[:, None],
                                                             num_top)
  return DecodeState(cache=mutated['cache'], tokens_B=first_B, positions_B=lengths_B,
                     num_new_B=jnp.ones_like(lengths_B), max_new_B=max_new_B,
                     done_B=is_stop(first_B, stop_ids) | (max_new_B <= 1), sampling=settings,
                     logprob_B=logprob_B1[:, 0], top_ids_BR=top_ids_B1R[:, 0],
                     top_logprobs_BR=top_logprobs_B1R[:, 0])


@jax.jit
def insert(state: DecodeState, rows: DecodeState, slot: jax.Array) -> DecodeState:
  """`state` with the rows of `rows` (from `prefill`, the same cache_len) in slots slot, slot + 1,
  ...; the other rows are untouched."""
  def put(into, new):
    if isinstance(into, nn.LogicallyPartitioned):  # A cache leaf: its names say where rows are.
      return into.replace_boxed(jax.lax.dynamic_update_slice_in_dim(
          into.value, new.value, slot, into.names.index('batch')))
    return jax.lax.dynamic_update_slice_in_dim(into, new, slot, 0)

  return jax.tree.map(put, state, rows, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@functools.partial(jax.jit, static_argnames='model', donate_argnames='state')
def decode_step(model: Transformer, variables, state: DecodeState,
                stop_ids: jax.Array) -> DecodeState:
  """Every row that has not stopped runs its newest token and draws the next one."""
  logits_B1V, mutated = model.apply({**variables, 'cache': state.cache}, state.tokens_B[:, None],
                                    state.positions_B[:, None], cache=attention.Decode(),
                                    mutable=['cache'])
  drawn_B = draw(logits_B1V[:, 0], state.sampling, state.num_new_B)
  running_B = ~state.done_B
  tokens_B = jnp.where(running_B, drawn_B, state.tokens_B)
  num_new_B = state.num_new_B + running_B
  stopped_B = running_B & is_stop(tokens_B, stop_ids)
  logprob_B1, top_ids_B1R, top_logprobs_B1R = token_logprobs(
      logits_B1V, tokens_B[:, None], state.top_ids_BR.shape[1])
  return state.replace(cache=mutated['cache'], tokens_B=tokens_B,
                       positions_B=state.positions_B + running_B, num_new_B=num_new_B,
                       done_B=state.done_B | stopped_B | (num_new_B >= state.max_new_B),
                       logprob_B=logprob_B1[:, 0], top_ids_BR=top_ids_B1R[:, 0],
                       top_logprobs_BR=top_logprobs_B1R[:, 0])


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens'), donate_argnames='state')
def decode_loop(model: Transformer, variables, state: DecodeState, stop_ids: jax.Array,
                max_new_tokens: int) -> tuple[DecodeState, jax.Array]:
  """Decode steps until every row has stopped: (the final state, tokens_BC), where row b holds
  its new tokens then -1s, replicated for every host to read; max_new_tokens (C) bounds every
  row's max_new_B."""
  rows_B = jnp.arange(state.tokens_B.shape[0])
  record = lambda state, tokens_BC: tokens_BC.at[rows_B, state.num_new_B - 1].set(state.tokens_B)

  def step(carry):
    state, tokens_BC = carry
    state = decode_step(model, variables, state, stop_ids)
    return state, record(state, tokens_BC)

  tokens_BC = record(state, jnp.full((rows_B.size, max_new_tokens), -1, jnp.int32))
  state, tokens_BC = jax.lax.while_loop(lambda carry: ~jnp.all(carry[0].done_B), step,
                                        (state, tokens_BC))
  return state, nn.with_logical_constraint(tokens_BC, (None, None))


# --- the whole thing ------------------------------------------------------------------------

def batch_multiple() -> int:
  """How many ways the current mesh (sharding.use_mesh) splits a batch; 1 outside one."""
  if jax.sharding.get_abstract_mesh().empty:
    return 1
  return sharding.data_parallel_size(jax.sharding.get_mesh(), nn.get_logical_axis_rules())


def bucket(length: int, limit: int) -> int:
  """`length` rounded up to a power of two (at least 16, at most `limit`): calls with other
  prompt lengths reuse the compiled prefill and decode loop."""
  return min(limit, max(16, 1 << (length - 1).bit_length()))


def pad_prompts(prompt_tokens: Sequence[Sequence[int]], rows: int,
                length: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [rows, length] right-padded with 0, lengths [rows]); rows past the prompts hold one
  token."""
  lengths_B = np.ones(rows, np.int32)
  lengths_B[:len(prompt_tokens)] = [len(p) for p in prompt_tokens]
  tokens_BT = np.zeros((rows, length), np.int32)
  for row, prompt in enumerate(prompt_tokens):
    tokens_BT[row, :len(prompt)] = prompt
  return tokens_BT, lengths_B


def generate(model: Transformer, variables, prompt_tokens: Sequence[Sequence[int]],
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, eos_id: int | None = None, *, min_p: float = 0.0,
             stop_ids: Sequence[int] = (), adapter: str | None = None) -> list[list[int]]:
  """The new tokens of each prompt (lists of token ids, any lengths), in one batch.

  Each row ends before its first stop token (`eos_id` or any of `stop_ids`, not returned) or after
  max_new_tokens. temperature 0 is greedy; otherwise top_k, top_p and min_p filter (0, 1 and 0
  are off) and the draws are a function of `seed` and the prompt's index. With `variables` a
  lora.AdapterSet, `adapter` names the adapter to decode with (switching compiles nothing new).
  """
  variables = lora.chosen(variables, adapter)
  cfg = model.cfg
  check_prompts(cfg, prompt_tokens, max_new_tokens)
  rows = -(-len(prompt_tokens) // batch_multiple()) * batch_multiple()
  longest = max(map(len, prompt_tokens))
  tokens_BT, lengths_B = pad_prompts(prompt_tokens, rows, bucket(longest, cfg.max_seq_len))
  stop_set = {*stop_ids, *([] if eos_id is None else [eos_id])}
  stops = stop_array(sorted(stop_set))
  max_new_B = np.where(np.arange(rows) < len(prompt_tokens), max_new_tokens, 1)  # Pad rows stop.
  cache_len = cache_length(cfg, bucket(longest + cfg.peft.virtual_tokens + max_new_tokens - 1,
                                       cfg.max_seq_len))
  state = prefill(model, variables, tokens_BT, lengths_B, cache_len,
                  sampling(rows, temperature, top_k, top_p, min_p, seed), max_new_B, stops)
  tokens_BC = np.asarray(decode_loop(model, variables, state, stops, max_new_tokens)[1])
  new = []
  for row_C in tokens_BC[:len(prompt_tokens)]:
    tokens = row_C[row_C >= 0].tolist()
    new.append(tokens[:-1] if tokens[-1] in stop_set else tokens)
  return new
