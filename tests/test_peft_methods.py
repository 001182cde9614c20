"""The PEFT family beyond LoRA (config.peft.method): AdaLoRA, Houlsby and Pfeiffer bottleneck
adapters, prompt tuning. Their formulas against numpy and PEFT's schedule, decoding, and runs."""
import json
import queue

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lepton_jax import adalora, adapters, config_lib, generate, lora, sample, train, tree
from lepton_jax.model import ModelConfig, Transformer, prompt
from lepton_jax.model.config import LoraConfig, PeftConfig
from tests.conftest import read_metrics, tiny_config, train_preempted_and_resumed

TOKENS = np.random.default_rng(0).integers(0, 64, (2, 12))


def tiny_model(peft=PeftConfig(), scan_layers=False, **lora_fields) -> Transformer:
  model_config = config_lib.model_config()
  model_config.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, d_ff=48, max_seq_len=64, scan_layers=scan_layers)
  return Transformer(ModelConfig(**model_config.to_dict(), lora=LoraConfig(**lora_fields),
                                 peft=peft))


def init(model, seed=0):
  return nn.unbox(model.init(jax.random.key(seed), jnp.asarray(TOKENS)))


def moved(variables, seed=1):
  """Every adapter leaf moved off its init, as after training."""
  key = jax.random.key(seed)
  return tree.map_with_names(
      lambda name, x: x + 0.1 * jax.random.normal(jax.random.fold_in(key, hash(name) % 2**31),
                                                  x.shape)
      if tree.matches(adapters.ADAPTERS, name.removeprefix('params/')) else x, variables)


BASE = tiny_model()
BASE_VARIABLES = init(BASE)


@pytest.mark.parametrize('model', [
    tiny_model(PeftConfig('houlsby')), tiny_model(PeftConfig('pfeiffer', activation='gelu')),
    tiny_model(PeftConfig('adalora'), targets=('all-linear',), rank=4, svd=True),
    tiny_model(PeftConfig('adalora'), scan_layers=True, targets=('q', 'v'), rank=4, svd=True),
], ids=['houlsby', 'pfeiffer', 'adalora', 'adalora_scan'])
def test_a_fresh_adapter_changes_nothing(model):
  variables = init(model)
  assert adapters.adapter_of(variables['params'])
  base = adapters.base_of(variables['params'])
  if model.cfg.scan_layers:
    base_model = tiny_model(scan_layers=True)
  else:
    base_model = BASE
    assert tree.names(base) == tree.names(BASE_VARIABLES['params'])
  np.testing.assert_array_equal(model.apply(variables, TOKENS),
                                base_model.apply({'params': base}, TOKENS))


def test_a_fresh_prompt_is_the_tokens_it_copies():
  """Prompt tuning cannot leave the logits unchanged (its tokens are context); 'vocab' init makes
  it exactly the base reading the copied tokens first."""
  model = tiny_model(PeftConfig('prompt', num_virtual_tokens=5, seed=3))
  variables = init(model)
  ids = prompt.vocab_ids(model.cfg)
  with_prefix = np.concatenate([np.broadcast_to(ids, (2, 5)), TOKENS], axis=1)
  np.testing.assert_allclose(model.apply(variables, TOKENS),
                             BASE.apply(BASE_VARIABLES, with_prefix)[:, 5:], atol=1e-6)
  random = init(tiny_model(PeftConfig('prompt', num_virtual_tokens=5, prompt_init='random')))
  assert abs(float(np.std(random['params'][prompt.PARAM])) - 0.02) < 0.01


@pytest.mark.parametrize('method, sublayers', [('houlsby', ('attn', 'mlp')),
                                               ('pfeiffer', ('mlp',))])
def test_bottleneck_adapters_follow_their_sublayers_as_the_formula_says(method, sublayers):
  model = tiny_model(PeftConfig(method, bottleneck=4))
  variables = moved(init(model))
  _, state = model.apply(variables, TOKENS, capture_intermediates=True, mutable=['intermediates'])
  for layer in ('layers_0', 'layers_1'):
    outputs = state['intermediates'][layer]
    assert {name for name in outputs if name.endswith('_adapter')} == {
        f'{sublayer}_adapter' for sublayer in sublayers}
    for sublayer in sublayers:
      adapter = variables['params'][layer][f'{sublayer}_adapter']
      h = np.asarray(outputs[sublayer]['__call__'][0])  # What attention / the MLP returned.
      hidden = np.maximum(h @ adapter['down']['kernel'] + adapter['down']['bias'], 0)
      np.testing.assert_allclose(outputs[f'{sublayer}_adapter']['__call__'][0],
                                 h + hidden @ adapter['up']['kernel'] + adapter['up']['bias'],
                                 atol=1e-5)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_prompt_tuned_decoding_equals_the_full_forward_pass(scan_layers):
  model = tiny_model(PeftConfig('prompt', num_virtual_tokens=6, prompt_init='random'),
                     scan_layers=scan_layers)
  variables = moved(init(model))
  prompts = [[3, 9, 4, 1, 7], [5, 2]]
  new = generate.generate(model, variables, prompts, max_new_tokens=6)
  for prompt_tokens, tokens in zip(prompts, new):
    expected = list(prompt_tokens)
    for _ in range(6):  # Greedy, one full forward pass (virtual tokens included) per token.
      expected.append(int(np.argmax(model.apply(variables, np.asarray([expected]))[0, -1])))
    assert tokens == expected[len(prompt_tokens):]


def test_the_server_decodes_a_prompt_tuned_model_as_generate_does():
  from lepton_jax.serve import engine as engine_lib  # pylint: disable=g-import-not-at-top
  model = tiny_model(PeftConfig('prompt', num_virtual_tokens=6, prompt_init='random'))
  variables = moved(init(model))
  engine = engine_lib.Engine(model, variables, stop_ids=[], max_batch=2)
  assert engine.max_seq_len == 64 - 6  # The request's positions; the virtual tokens hold 6.
  prompts, events = [[3, 9, 4, 1, 7], [5, 2]], [queue.Queue(), queue.Queue()]
  engine.start()
  try:
    for tokens, queue_ in zip(prompts, events):
      engine.submit(engine_lib.Request(tokens, 5, emit=queue_.put))
    got = []
    for queue_ in events:
      got.append([])
      while not isinstance(event := queue_.get(timeout=120), engine_lib.Finished):
        got[-1].append(event.id)
  finally:
    engine.stop()
  assert got == generate.generate(model, variables, prompts, max_new_tokens=5)


def test_adalora_dense_merges_like_lora():
  model = tiny_model(PeftConfig('adalora'), targets=('all-linear',), rank=4, svd=True)
  variables = moved(init(model))
  merged_model, merged = lora.merge(model, variables)
  assert not any('lora' in name for name in tree.names(merged))
  np.testing.assert_allclose(merged_model.apply(merged, TOKENS), model.apply(variables, TOKENS),
                             atol=1e-5)
  query = variables['params']['layers_0']['attn']['query']
  a, e, b = (np.asarray(query[k]) for k in ('lora_a', 'lora_e', 'lora_b'))
  expected = 16.0 / (4 + 1e-5) * (a.reshape(32, 4) * e) @ b.reshape(4, -1)  # alpha / ranknum.
  np.testing.assert_allclose(lora.delta(query, model.cfg.lora, False).reshape(32, -1), expected,
                             rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_orthogonality_equals_numpy(scan_layers):
  model = tiny_model(PeftConfig('adalora'), scan_layers=scan_layers, targets=('q', 'down'), rank=3,
                     svd=True)
  params = moved(init(model))['params']
  norms = []
  stack = (lambda x: x) if scan_layers else (lambda x: x[None])
  for module in lora._adapted_modules(params).values():
    for a, b in zip(stack(np.asarray(module['lora_a'])), stack(np.asarray(module['lora_b']))):
      p_ri, q_or = a.reshape(-1, 3).T, b.reshape(3, -1).T  # PEFT's lora_A [r, in], lora_B [out, r].
      norms += [np.linalg.norm(p_ri @ p_ri.T - np.eye(3)),
                np.linalg.norm(q_or.T @ q_or - np.eye(3))]
  assert len(norms) == 8
  np.testing.assert_allclose(adalora.orthogonality(params), np.mean(norms), rtol=1e-5)


def test_the_budget_schedule_is_peft_s():
  layer = pytest.importorskip('peft.tuners.adalora.layer')
  for total, tinit, tfinal in ((40, 5, 8), (200, 0, 1), (13, 3, 3)):
    allocator = object.__new__(layer.RankAllocator)
    allocator.peft_config = type('Config', (), dict(tinit=tinit, tfinal=tfinal, total_step=total,
                                                    deltaT=1))
    allocator.init_bgt, allocator.target_bgt = 96, 64
    expected = [allocator.budget_schedule(step)[0] for step in range(total)]
    assert adalora.budgets(96, 64, total, tinit, tfinal).tolist() == expected


ADALORA = {'peft.method': 'adalora', 'lora.targets': ('q', 'v', 'down'), 'lora.rank': 4,
           'peft.target_rank': 2, 'peft.tinit': 1, 'peft.tfinal': 2, 'peft.delta_t': 2}
METHODS = {
    'adalora': ADALORA,
    'houlsby': {'peft.method': 'houlsby', 'peft.bottleneck': 4},
    'pfeiffer': {'peft.method': 'pfeiffer', 'peft.bottleneck': 4},
    'prompt': {'peft.method': 'prompt', 'peft.num_virtual_tokens': 4, 'model.max_seq_len': 40},
}


def method_config(tmp_path, method, **overrides):
  return tiny_config(tmp_path, total_steps=6, checkpoint_every_steps=3, eval_every_steps=6,
                     batch_size=8, **{'model.vocab_size': 257, 'optimizer.learning_rate': 1e-2,
                                      **METHODS[method], **overrides})


@pytest.mark.parametrize('method', list(METHODS))
def test_a_run_trains_only_its_adapters_and_resumes_exactly(tmp_path, method, monkeypatch):
  config = method_config(tmp_path, method)
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  train.train_and_evaluate(config, str(straight))
  train_preempted_and_resumed(config, resumed, monkeypatch, 2)
  losses = lambda workdir: [r['train/loss'] for r in read_metrics(workdir)]
  assert losses(straight) == losses(resumed)

  saved = ocp.PyTreeCheckpointHandler().metadata(straight / 'checkpoints' / '6' / 'state').tree
  patterns = adapters.PATTERNS[method]
  assert all(tree.matches(patterns, name) for name in tree.names(saved['trainable']))
  moments = [name for name in tree.names(saved['opt_state']) if '/mu/' in name]
  assert moments and all(tree.matches(patterns, name.split('/mu/')[1]) for name in moments)
  after = sample.load(config, str(straight))[1]['params']
  before = sample.load(config, str(straight), step=3)[1]['params']
  for name, a, b in zip(tree.names(adapters.adapter_of(after)),
                        jax.tree.leaves(adapters.adapter_of(after)),
                        jax.tree.leaves(adapters.adapter_of(before))):
    assert np.any(np.asarray(a) != np.asarray(b)), name  # Every adapter leaf trains.
  if method == 'adalora':
    record = json.loads((straight / adalora.RANKS_FILE).read_text())
    assert record['ranks'] == adalora.ranks(after)
    assert record['total_rank'] == 2 * 6  # target_rank x 6 matrices, exactly.
    assert adalora.ranks(before) != adalora.ranks(after)  # Step 3 is mid-schedule.


@pytest.mark.parametrize('overrides, message', [
    ({**ADALORA, 'peft.target_rank': 6},
     r'config.peft.target_rank=6: must be in \[1, config.lora.rank=4\]'),
    ({'peft.method': 'adalora'}, r"config.peft.method='adalora' adapts config.lora.targets"),
    ({**ADALORA, 'peft.tfinal': 0}, r'config.peft.tfinal=0'),
    ({**ADALORA, 'peft.tinit': 20}, r'leaves no pruning step'),
    ({**ADALORA, 'lora.dora': True}, r'no DoRA form'),
    ({'peft.method': 'prompt', 'peft.num_virtual_tokens': 0},
     r'config.peft.num_virtual_tokens=0: prompt tuning needs at least one'),
    ({'peft.method': 'prompt', 'peft.num_virtual_tokens': 8},
     r'config.seq_len=32 \+ config.peft.num_virtual_tokens=8 exceeds config.model.max_seq_len=32'),
    ({'peft.method': 'houlsby', 'lora.targets': ('q',)},
     r"config.peft.method='houlsby' trains its own adapters: leave config.lora.targets"),
    ({'peft.method': 'pfeiffer', 'peft.bottleneck': 0}, r'config.peft.bottleneck=0'),
    ({'peft.method': 'ia3'}, r"config.peft.method='ia3': expected one of"),
])
def test_bad_peft_settings_are_one_line_errors(tmp_path, overrides, message):
  config = tiny_config(tmp_path, total_steps=10, **overrides)
  with pytest.raises(ValueError, match=message) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert '\n' not in str(error.value)
  assert not (tmp_path / 'run' / 'checkpoints').exists()
