"""LoRA adapters: the Dense formulas against numpy, merge, switching, and LoRA training runs."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lepton_jax import config_lib, data, evaluate, experiment, generate, lora, sample, sharding
from lepton_jax import steps, train, train_state, tree
from lepton_jax.model import ModelConfig, Transformer, layers
from lepton_jax.model.config import LoraConfig
from tests.conftest import (finetune_config, read_metrics, save_tiny_hf_llama, tiny_config,
                            train_preempted_and_resumed)

TOKENS = np.random.default_rng(0).integers(0, 64, (2, 12))


def tiny_model(scan_layers=False, **lora_fields) -> Transformer:
  model_config = config_lib.model_config()
  model_config.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, d_ff=48, scan_layers=scan_layers)
  return Transformer(ModelConfig(**model_config.to_dict(), lora=LoraConfig(**lora_fields)))


def init(model, seed=0):
  return nn.unbox(model.init(jax.random.key(seed), jnp.asarray(TOKENS)))


def perturb_adapters(variables, seed=1):
  """Non-zero B (and magnitudes off their init), as after training."""
  key = jax.random.key(seed)
  def move(name, x):
    if tree.matches(lora.ADAPTERS, name) and not name.endswith('lora_a'):
      return x + 0.1 * jax.random.normal(jax.random.fold_in(key, hash(name) % 2**31), x.shape)
    return x
  return tree.map_with_names(move, variables)


@pytest.mark.parametrize('fields', [dict(targets=('all-linear',)),
                                    dict(targets=('q', 'v'), rslora=True, init='gaussian'),
                                    dict(targets=('all-linear',), dora=True)])
def test_a_fresh_adapter_changes_nothing(fields):
  adapted = tiny_model(**fields)
  variables = init(adapted)
  base_variables = {'params': lora.base_of(variables['params'])}
  np.testing.assert_array_equal(adapted.apply(variables, TOKENS),
                                tiny_model().apply(base_variables, TOKENS))


@pytest.mark.parametrize('rslora, dora', [(False, False), (True, False), (False, True),
                                          (True, True)])
def test_dense_matches_the_lora_formulas_in_numpy(rslora, dora):
  rank, alpha = 4, 8.0
  dense = layers.Dense((3, 5), in_axes=('embed',), out_axes=('heads', 'head_dim'), use_bias=True,
                       lora=LoraConfig(targets=('.*',), rank=rank, alpha=alpha, rslora=rslora,
                                       dora=dora))
  x = np.random.default_rng(0).normal(size=(2, 7, 6)).astype(np.float32)
  params = nn.unbox(dense.init(jax.random.key(0), x))['params']
  rng = np.random.default_rng(1)
  params = {k: np.asarray(v) + (rng.normal(size=v.shape).astype(np.float32) * 0.3
                                if k in ('lora_b', 'lora_magnitude', 'bias') else 0)
            for k, v in params.items()}
  w = params['kernel'].reshape(6, 15)
  scale = alpha / (np.sqrt(rank) if rslora else rank)
  adapted = w + scale * params['lora_a'] @ params['lora_b'].reshape(rank, 15)
  if dora:
    adapted = adapted / np.linalg.norm(adapted, axis=0) * params['lora_magnitude'].reshape(15)
  expected = (x.reshape(14, 6) @ adapted + params['bias'].reshape(15)).reshape(2, 7, 3, 5)
  np.testing.assert_allclose(dense.apply({'params': params}, x), expected, atol=1e-5)


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('dora', [False, True])
def test_merge_equals_the_adapters_and_unmerge_undoes_it(scan_layers, dora):
  model = tiny_model(scan_layers, targets=('all-linear',), rank=4, dora=dora)
  variables = perturb_adapters(init(model))
  logits = model.apply(variables, TOKENS)
  merged_model, merged = lora.merge(model, variables)
  assert not merged_model.cfg.lora.enabled
  assert not any('lora' in name for name in tree.names(merged))
  np.testing.assert_allclose(merged_model.apply(merged, TOKENS), logits, atol=1e-5)
  adapter = lora.adapter_of(variables['params'])
  if dora:
    with pytest.raises(ValueError, match='DoRA merge rescales'):
      lora.unmerge(merged_model, merged, adapter, model.cfg.lora)
    return
  _, unmerged = lora.unmerge(merged_model, merged, adapter, model.cfg.lora)
  for name, a, b in zip(tree.names(variables), jax.tree.leaves(variables),
                        jax.tree.leaves(unmerged)):
    np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)


def test_lora_logits_on_an_fsdp_tensor_mesh_equal_one_device():
  model = tiny_model(targets=('all-linear',), dora=True)
  variables = perturb_adapters(init(model))
  expected = model.apply(variables, TOKENS)
  mesh_config = config_lib.base_config().mesh
  mesh_config.update(data=2, fsdp=2, tensor=2)
  mesh, rules = sharding.make_mesh(mesh_config), mesh_config.rules
  boxed = model.init(jax.random.key(0), jnp.asarray(TOKENS))
  shardings = sharding.param_shardings(jax.eval_shape(lambda: boxed), mesh, rules)
  assert shardings['params']['layers_0']['attn']['query']['lora_b'].spec == jax.sharding.PartitionSpec(
      None, 'tensor', None)  # B [r, N, H] splits its heads like the kernel it adapts.
  placed = jax.device_put(variables, shardings)
  with sharding.use_mesh(mesh, rules):
    logits = jax.jit(model.apply)(placed, jnp.asarray(np.concatenate([TOKENS, TOKENS])))
  np.testing.assert_allclose(logits[:2], expected, atol=1e-5)


LORA = {'lora.targets': ('q', 'v'), 'lora.rank': 4, 'model.vocab_size': 257}


def test_a_lora_run_trains_only_the_adapters_and_saves_only_them(tmp_path):
  config = tiny_config(tmp_path, total_steps=6, batch_size=16, grad_accum_steps=2, **LORA,
                       **{'optimizer.learning_rate': 1e-2})
  run = experiment.build(config, str(tmp_path / 'run'), same_split=True)
  assert run.trainable == lora.ADAPTERS
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir))
  records = read_metrics(workdir)
  assert records[-1]['train/loss'] < records[0]['train/loss']

  before = init_like_run(config)
  after = sample.load(config, str(workdir))[1]
  for name, a, b in zip(tree.names(before), jax.tree.leaves(before), jax.tree.leaves(after)):
    if tree.matches(('params/.*/lora_b',), name):
      assert np.any(np.asarray(a) != np.asarray(b)), name
    elif not tree.matches(('params/.*/lora_a',), name):
      np.testing.assert_array_equal(a, b, err_msg=name)  # The base, bit for bit.
  saved = ocp.PyTreeCheckpointHandler().metadata(workdir / 'checkpoints' / '6' / 'state').tree
  assert all('lora_' in name for name in tree.names(saved['trainable']))
  moments = [name for name in tree.names(saved['opt_state']) if '/mu/' in name]
  assert moments and all('lora_' in name for name in moments)


def init_like_run(config):
  """The variables a fresh run of `config` starts from."""
  run_model = Transformer(ModelConfig.from_config(config.model, config.lora))
  tx, _ = experiment.make_optimizer(config)
  mesh = sharding.make_mesh(config.mesh)
  with sharding.use_mesh(mesh, config.mesh.rules):
    layout = train_state.make_layout(run_model, tx, mesh, config.mesh.rules, config.seq_len,
                                     lora.trainable_patterns(config))
    state, frozen = train_state.init_state(run_model, tx, config.seed, config.seq_len, layout)
  return steps.model_variables(state.trainable, frozen)


def test_lora_plus_scales_the_learning_rate_of_b(tmp_path):
  updates = {}
  for ratio in (1.0, 4.0):
    config = tiny_config(tmp_path, total_steps=1, **LORA, **{
        'lora.plus_ratio': ratio, 'optimizer.name': 'sgd', 'optimizer.momentum': 0.0,
        'optimizer.warmup_steps': 0, 'optimizer.clip_norm': 0.0, 'optimizer.weight_decay': 0.0})
    workdir = tmp_path / f'ratio_{ratio}'
    train.train_and_evaluate(config, str(workdir))
    before, after = init_like_run(config), sample.load(config, str(workdir))[1]
    updates[ratio] = jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), before, after)
  b_of = lambda u: u['params']['layers_0']['attn']['query']['lora_b']
  a_of = lambda u: u['params']['layers_0']['attn']['query']['lora_a']
  np.testing.assert_allclose(b_of(updates[4.0]), 4 * b_of(updates[1.0]), rtol=1e-5, atol=1e-9)
  np.testing.assert_array_equal(a_of(updates[4.0]), a_of(updates[1.0]))  # 0 at step 1 (B = 0).


def test_a_lora_run_resumes_exactly(tmp_path, monkeypatch):
  config = tiny_config(tmp_path, total_steps=6, **LORA, **{'lora.dropout': 0.1})
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  train_preempted_and_resumed(config, tmp_path / 'resumed', monkeypatch, 3)
  assert ([r['train/loss'] for r in read_metrics(tmp_path / 'straight')] ==
          [r['train/loss'] for r in read_metrics(tmp_path / 'resumed')])


@pytest.mark.parametrize('overrides, message', [
    ({'lora.targets': ('q', 'attn/nothing')}, r"'attn/nothing' matches no Dense layer"),
    ({'lora.targets': ('head',), 'model.tie_embeddings': True},
     r"'head' matches no Dense layer \(the output head is tied"),
    ({'lora.targets': ('q',), 'lora.rank': 0}, r'config.lora.rank=0: must be positive'),
    ({'lora.targets': ('q',), 'lora.init': 'orthogonal'}, r"config.lora.init='orthogonal'"),
])
def test_bad_lora_configs_are_one_line_errors(tmp_path, overrides, message):
  config = tiny_config(tmp_path, **overrides)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_lora_on_a_hugging_face_base_references_it_and_refuses_another(tmp_path):
  pytest.importorskip('transformers')
  save_tiny_hf_llama(tmp_path / 'base')
  config = finetune_config(tmp_path / 'base', tmp_path, total_steps=4, checkpoint_every_steps=2,
                           **{'lora.targets': ('all-linear',), 'lora.rank': 2,
                              'optimizer.learning_rate': 1e-2})
  straight = tmp_path / 'straight'
  train.train_and_evaluate(config, str(straight))
  # The base is not copied into the run: each checkpoint names it and its fingerprint.
  assert not (straight / 'frozen').exists()
  meta = json.loads((straight / 'checkpoints' / '4' / 'meta' / 'metadata').read_text())
  assert meta['frozen_from']['source'] == f'hf:{tmp_path / "base"}'
  saved = ocp.PyTreeCheckpointHandler().metadata(straight / 'checkpoints' / '4' / 'state').tree
  nbytes = lambda leaves: sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)
  saved_bytes = nbytes(jax.tree.leaves(saved['trainable']) + jax.tree.leaves(saved['opt_state']))
  base_bytes = (tmp_path / 'base' / 'model.safetensors').stat().st_size
  assert saved_bytes < 0.25 * base_bytes  # Adapters and their two moments only.

  resumed = tmp_path / 'resumed'
  with pytest.MonkeyPatch.context() as patch:  # Preempted after step 2, then restarted.
    patch.setattr(train.PreemptionWatch, 'reached', lambda self, step: step == 2)
    train.train_and_evaluate(config, str(resumed))
  train.train_and_evaluate(config, str(resumed))
  lora_params = lambda workdir: jax.tree.leaves(lora.adapter_of(
      sample.load(config, str(workdir))[1]['params']))
  for a, b in zip(lora_params(straight), lora_params(resumed)):
    np.testing.assert_array_equal(a, b)

  save_tiny_hf_llama(tmp_path / 'other', seed=1)
  (tmp_path / 'base' / 'model.safetensors').write_bytes(
      (tmp_path / 'other' / 'model.safetensors').read_bytes())
  with pytest.raises(ValueError, match=r'trained on a base with fingerprint [0-9a-f]{16}, but '
                                       r'config.init_from gives one with fingerprint [0-9a-f]{16}'):
    sample.load(config, str(straight))


def test_an_adapter_set_switches_by_name_and_refuses_another_layout():
  model = tiny_model(targets=('q', 'v'))
  base = init(model)
  adapters = lora.AdapterSet(base)
  for seed in (1, 2):
    adapters.add(f'a{seed}', lora.adapter_of(perturb_adapters(base, seed)['params']))
  for seed in (1, 2):
    np.testing.assert_array_equal(model.apply(adapters.variables(f'a{seed}'), TOKENS),
                                  model.apply(perturb_adapters(base, seed), TOKENS))
  with pytest.raises(ValueError, match=r"no adapter named 'a3'; loaded: \['a1', 'a2'\]"):
    adapters.variables('a3')
  other = init(tiny_model(targets=('q', 'v'), rank=2))
  with pytest.raises(ValueError, match="adapter 'r2' has other targets or rank than 'a1'"):
    adapters.add('r2', lora.adapter_of(other['params']))


def test_all_linear_with_more_targets_adapts_them_too():
  names = tree.names(init(tiny_model(targets=('all-linear', 'head'))))
  assert 'params/head/lora_a' in names and 'params/layers_1/mlp/down/lora_b' in names


def test_generate_and_evaluate_take_an_adapter_name(tmp_path):
  config = tiny_config(tmp_path, **{**LORA, 'lora.targets': ('all-linear',)})
  model = Transformer(ModelConfig.from_config(config.model, config.lora))
  base = init(model)
  adapters = lora.AdapterSet(base)
  for seed in (1, 2):
    adapters.add(f'a{seed}', lora.adapter_of(perturb_adapters(base, seed)['params']))
  prompts = [[5, 6, 7], [8, 9]]
  for seed in (1, 2):
    assert (generate.generate(model, adapters, prompts, 6, adapter=f'a{seed}') ==
            generate.generate(model, perturb_adapters(base, seed), prompts, 6))
  tokenizer = data.build_tokenizer(config.data, str(tmp_path), train_if_missing=False)
  losses = {name: evaluate.evaluate(config, model, adapters, tokenizer, measure_cost=False,
                                    adapter=name)['eval/loss'] for name in ('a1', 'a2')}
  assert losses['a1'] == evaluate.evaluate(config, model, perturb_adapters(base, 1), tokenizer,
                                           measure_cost=False)['eval/loss']
  assert losses['a1'] != losses['a2']
  with pytest.raises(ValueError, match=r"needs adapter=NAME; loaded: \['a1', 'a2'\]"):
    generate.generate(model, adapters, prompts, 2)
  with pytest.raises(ValueError, match=r"adapter='a1' picks an adapter of a lora.AdapterSet"):
    generate.generate(model, base, prompts, 2, adapter='a1')


@pytest.mark.parametrize('scan_layers', [False, True])
def test_rows_of_a_batch_adapted_by_their_own_adapters_equal_each_alone(scan_layers):
  model = tiny_model(scan_layers=scan_layers, targets=('all-linear',), rank=4)
  variables = init(model)
  adapters = [lora.adapter_of(perturb_adapters(variables, seed)['params']) for seed in (1, 2, 3)]
  ids_B = jnp.asarray([2, 0, 1, 0])
  tokens_BT = jnp.asarray(np.random.default_rng(3).integers(0, 64, (4, 12)))
  base = dict(variables, params=lora.base_of(variables['params']))
  mixed_BTV = model.apply(dict(base, **lora.per_row(model.cfg, lora.stack(adapters), ids_B)),
                          tokens_BT)
  for row, adapter_id in enumerate(ids_B.tolist()):
    alone = dict(variables, params=lora.with_adapter(variables['params'], adapters[adapter_id]))
    np.testing.assert_allclose(mixed_BTV[row], model.apply(alone, tokens_BT[row:row + 1])[0],
                               atol=1e-5)
  dora = tiny_model(scan_layers=scan_layers, targets=('q',), rank=4, dora=True)
  with pytest.raises(ValueError, match='lora.per_row: DoRA rescales'):
    lora.per_row(dora.cfg, lora.stack(adapters), ids_B)
