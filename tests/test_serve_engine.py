"""The serving engine: requests of many lengths arriving while others decode give the tokens
generate.generate gives each alone, compile nothing after start, free their slots at once, and
report log-probs that equal the forward pass."""
import queue
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import generate, lora, sharding
from lepton_jax.model import ModelConfig, Transformer
from lepton_jax.serve import engine as engine_lib
from tests.conftest import tiny_config

VOCAB = 64


def tiny_model(**fields):
  config = tiny_config(**{f'model.{k}': v for k, v in {'vocab_size': VOCAB, 'max_seq_len': 64,
                                                        **fields}.items()})
  model = Transformer(ModelConfig.from_config(config.model))
  return model, nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))


def prompt(length: int, seed: int) -> list[int]:
  return np.random.default_rng(seed).integers(0, VOCAB, length).tolist()


class Collector:
  """A request's events, gathered from the engine thread."""

  def __init__(self):
    self.events = queue.Queue()

  def emit(self, event):
    self.events.put(event)

  def result(self, timeout: float = 60.0):
    tokens, scores = [], None
    deadline = time.monotonic() + timeout
    while True:
      event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
      if isinstance(event, engine_lib.Token):
        tokens.append(event)
      elif isinstance(event, engine_lib.Prompt):
        scores = event
      else:
        return tokens, scores, event


@pytest.fixture(scope='module')
def served():
  model, variables = tiny_model()
  engine = engine_lib.Engine(model, variables, stop_ids=[], max_batch=4, max_queue=64)
  engine.start()
  yield model, variables, engine
  engine.stop()


def run(engine, requests):
  collectors = []
  for request in requests:
    collector = Collector()
    request.emit = collector.emit
    engine.submit(request)
    collectors.append(collector)
  return [c.result() for c in collectors]


def test_requests_of_many_lengths_decode_as_alone_and_compile_nothing(served):
  model, variables, engine = served
  lowered = []
  record = lambda event, duration, **kw: lowered.append(event)
  jax.monitoring.register_event_duration_secs_listener(record)
  try:
    lengths = [1, 3, 17, 5, 40, 9, 2, 33, 12, 7, 50, 4]  # Buckets 16, 32 and 64; > max_batch.
    budgets = [6, 2, 9, 1, 5, 12, 3, 7, 4, 10, 8, 2]
    requests = [engine_lib.Request(prompt(n, seed=i), max_new, emit=None)
                for i, (n, max_new) in enumerate(zip(lengths, budgets))]
    results = run(engine, requests)
  finally:
    jax.monitoring.unregister_event_duration_listener(record)
  assert '/jax/core/compile/jaxpr_to_mlir_module_duration' not in lowered, lowered
  for request, (tokens, _, finished) in zip(requests, results):
    expected = generate.generate(model, variables, [request.prompt], request.max_new)[0]
    assert [t.id for t in tokens] == expected
    assert finished.reason == 'length'
  assert engine.idle


def test_sampled_rows_draw_as_generate_does_from_the_seed_and_index(served):
  model, variables, engine = served
  p = prompt(6, seed=1)
  requests = [engine_lib.Request(p, 8, emit=None, temperature=1.0, top_k=10, seed=3, index=i)
              for i in range(3)]
  got = [[t.id for t in tokens] for tokens, _, _ in run(engine, requests)]
  assert got == generate.generate(model, variables, [p] * 3, 8, temperature=1.0, top_k=10, seed=3)


def test_a_stop_token_ends_the_row_and_frees_its_slot():
  model, variables = tiny_model()
  p = prompt(5, seed=2)
  free = generate.generate(model, variables, [p], 10)[0]
  stop = free[3]
  engine = engine_lib.Engine(model, variables, stop_ids=[stop], max_batch=1)
  engine.start()
  try:
    (tokens, _, finished), (other, _, _) = run(engine, [
        engine_lib.Request(p, 10, emit=None), engine_lib.Request(prompt(3, seed=4), 4, emit=None)])
  finally:
    engine.stop()
  assert [t.id for t in tokens] == free[:free.index(stop) + 1] and finished.reason == 'stop'
  assert len(other) == 4  # One slot: the second request ran once the first had stopped.


def test_logprobs_equal_the_forward_pass(served):
  model, variables, engine = served
  p = prompt(11, seed=5)
  (tokens, scores, finished), = run(engine, [
      engine_lib.Request(p, 4, emit=None, score_prompt=True)])
  full = [*p, *(t.id for t in tokens)]
  logprobs_TV = jax.nn.log_softmax(model.apply(variables, jnp.array([full]))[0], axis=-1)
  expected_T = np.asarray(logprobs_TV[np.arange(len(full) - 1), full[1:]])
  got = scores.logprobs + [t.logprob for t in tokens[:-1]]
  np.testing.assert_allclose(got, expected_T[:len(got)], atol=1e-5)
  for position, token in enumerate(tokens):  # Greedy: each token is the top one.
    assert token.top_ids[0] == token.id and token.top_logprobs[0] == token.logprob
    assert len(token.top_ids) == engine_lib.MAX_TOP
  top = np.asarray(jax.lax.top_k(logprobs_TV[:len(p) - 1], engine_lib.MAX_TOP)[1])
  assert scores.top_ids == top.tolist()


def test_cancelled_requests_leave_their_slot_and_a_full_queue_refuses():
  model, variables = tiny_model()
  engine = engine_lib.Engine(model, variables, stop_ids=[], max_batch=1, max_queue=1)
  engine.start()
  try:
    long, waiting = Collector(), Collector()
    first = engine_lib.Request(prompt(3, seed=0), 60, emit=long.emit)
    engine.submit(first)
    while engine.queue_depth:  # The first is taken into the one slot.
      time.sleep(0.01)
    engine.submit(engine_lib.Request(prompt(4, seed=1), 3, emit=waiting.emit))
    with pytest.raises(engine_lib.QueueFull, match='1 requests are already waiting'):
      engine.submit(engine_lib.Request([1], 1, emit=None))
    first.cancel()
    tokens, _, finished = long.result()
    assert finished.reason == 'cancelled' and len(tokens) < 60
    assert len(waiting.result()[0]) == 3
    engine.drain()
    with pytest.raises(engine_lib.Stopped):
      engine.submit(engine_lib.Request([1], 1, emit=None))
  finally:
    engine.stop()


def test_a_tensor_parallel_mesh_decodes_as_one_device():
  model, variables = tiny_model(num_heads=4, num_kv_heads=4, head_dim=8)
  prompts = [prompt(n, seed=n) for n in (3, 20)]
  expected = generate.generate(model, variables, prompts, 6)
  config = tiny_config(**{'mesh.data': 1, 'mesh.tensor': 4})
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:4])
  engine = engine_lib.Engine(model, variables, stop_ids=[], max_batch=2, mesh=mesh,
                             rules=config.mesh.rules)
  engine.start()
  try:
    got = [[t.id for t in tokens] for tokens, _, _ in
           run(engine, [engine_lib.Request(p, 6, emit=None) for p in prompts])]
  finally:
    engine.stop()
  assert got == expected
  kernel = engine.variables['params']['layers_0']['attn']['query']['kernel']
  assert len(kernel.sharding.device_set) == 4


def test_a_batch_split_over_data_is_refused():
  model, variables = tiny_model()
  config = tiny_config(**{'mesh.data': 2})
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:2])
  with pytest.raises(ValueError, match='set --config.mesh.data=1'):
    engine_lib.Engine(model, variables, stop_ids=[], mesh=mesh, rules=config.mesh.rules)


def test_a_failing_step_ends_its_requests_with_the_error_and_stops_admitting(monkeypatch):
  model, variables = tiny_model()
  engine = engine_lib.Engine(model, variables, stop_ids=[], max_batch=2)
  engine.start()

  def broken(*args):
    raise RuntimeError('device lost')

  monkeypatch.setattr(generate, 'decode_step', broken)
  try:
    (tokens, _, finished), = run(engine, [engine_lib.Request(prompt(4, seed=0), 5, emit=None)])
    assert finished.reason == 'error' and 'device lost' in finished.error and len(tokens) == 1
    assert 'device lost' in engine.failed
    with pytest.raises(engine_lib.Stopped):
      engine.submit(engine_lib.Request([1], 1, emit=None))
  finally:
    engine.stop()


def test_int8_weights_activations_and_kv_cache_serve_unchanged():
  quant = pytest.importorskip('lepton_jax.quant')
  from lepton_jax.model.config import QuantConfig  # pylint: disable=g-import-not-at-top
  model, variables = tiny_model()
  model, variables = quant.quantize(model, variables, QuantConfig(
      weights='int8', activations='int8', kv_cache='int8'))
  prompts = [prompt(n, seed=n) for n in (4, 19)]
  engine = engine_lib.Engine(model, variables, stop_ids=[], max_batch=2)
  engine.start()
  try:
    got = [[t.id for t in tokens] for tokens, _, _ in
           run(engine, [engine_lib.Request(p, 6, emit=None) for p in prompts])]
  finally:
    engine.stop()
  assert got == [generate.generate(model, variables, [p], 6)[0] for p in prompts]
  cache_dtypes = {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(engine._state.cache))}
  assert np.dtype('int8') in cache_dtypes and 'quant' in engine.variables


def test_requests_of_different_adapters_share_a_batch_and_decode_as_alone():
  config = tiny_config(**{'model.vocab_size': VOCAB, 'model.max_seq_len': 64,
                          'lora.targets': ('all-linear',), 'lora.rank': 4})
  adapted = Transformer(ModelConfig.from_config(config.model, config.lora))
  base = nn.unbox(adapted.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  adapters = {name: jax.tree.map(lambda x, k=jax.random.key(seed): x + 0.2 * jax.random.normal(
      k, x.shape), lora.adapter_of(base['params'])) for seed, name in ((1, 'alpha'), (2, 'beta'))}
  engine = engine_lib.Engine(adapted, base, stop_ids=[], max_batch=4, adapters=adapters)
  engine.start()
  try:
    names = ['alpha', None, 'beta', 'alpha', 'beta', None]
    requests = [engine_lib.Request(prompt(5 + 3 * i, seed=i), 8, emit=None, adapter=name)
                for i, name in enumerate(names)]
    results = run(engine, requests)
    with pytest.raises(ValueError, match=r"no adapter named 'gamma'; loaded: \['alpha', 'beta'\]"):
      engine.submit(engine_lib.Request([1, 2], 2, emit=None, adapter='gamma'))
  finally:
    engine.stop()
  adapter_set = lora.AdapterSet(base)
  for name, adapter in adapters.items():
    adapter_set.add(name, adapter)
  for request, (tokens, _, _) in zip(requests, results):  # The base: its adapters' B is zero.
    expected_variables = adapter_set.variables(request.adapter) if request.adapter else base
    expected = generate.generate(adapted, expected_variables, [request.prompt], 8)[0]
    assert [t.id for t in tokens] == expected, request.adapter
  assert generate.generate(adapted, adapter_set, [requests[0].prompt], 8, adapter='alpha') != \
      generate.generate(adapted, adapter_set, [requests[0].prompt], 8, adapter='beta')
