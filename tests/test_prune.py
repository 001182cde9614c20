"""Pruning (lepton_jax/prune.py): masks against numpy, their schedule, pruned weights and moments
staying zero through training and resume, structured pruning's smaller model, the script, and
the errors."""
import dataclasses
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lepton_jax import checkpoint, config_lib, experiment, prune, sample, sharding, train
from lepton_jax import train_state, tree
from lepton_jax.model import ModelConfig, Transformer
from lepton_jax.model.config import UNIT_KERNELS, PruneConfig
from tests.conftest import override, read_metrics, tiny_config, train_preempted_and_resumed

REPO = pathlib.Path(__file__).parent.parent


def tiny_model(scan: bool = False, **fields) -> Transformer:
  config = config_lib.model_config()
  config.update(dict(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, d_ff=128, max_seq_len=64, scan_layers=scan) | fields)
  return Transformer(ModelConfig.from_config(config))


def init(model: Transformer) -> dict:
  return nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))


def tokens(shape, seed=1) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), shape, 0, 64)


def masked_kernels(params: dict, prune_config: PruneConfig) -> dict[str, np.ndarray]:
  """Name -> each masked kernel as the 2-D [in, out] matrix its mask covers (per layer)."""
  _, masks = prune.masked_model(tiny_model(), prune_config)
  kernels = tree.select(params, masks)
  return {name: np.asarray(kernel).reshape(mask.shape) for name, kernel, mask in
          zip(tree.names(kernels), jax.tree.leaves(kernels), jax.tree.leaves(masks))}


def test_two_of_four_holds_in_every_group_and_keeps_the_two_largest():
  model = tiny_model()
  variables = init(model)
  nm = PruneConfig(method='n:m', n=2, m=4)
  _, pruned = prune.prune(model, variables, nm)
  before = masked_kernels(variables['params'], nm)
  after = masked_kernels(pruned['params'], nm)
  assert set(after) == {f'layers_{i}/{m}/kernel' for i in range(2) for m in (
      'attn/query', 'attn/key', 'attn/value', 'attn/out', 'mlp/up', 'mlp/gate', 'mlp/down')}
  for name, w in after.items():
    groups = w.reshape(w.shape[0] // 4, 4, w.shape[1])  # 4 consecutive inputs, per output.
    assert np.all(np.count_nonzero(groups, axis=1) == 2), name
    original = before[name].reshape(groups.shape)
    largest = np.argsort(-np.abs(original), axis=1, kind='stable')[:, :2]
    expected = np.take_along_axis(original, largest, axis=1)
    np.testing.assert_array_equal(np.sort(np.take_along_axis(groups, largest, axis=1), axis=1),
                                  np.sort(expected, axis=1), err_msg=name)
  assert jax.tree.all(jax.tree.map(np.array_equal, pruned['params']['head'],
                                   variables['params']['head']))  # Not in layers.


@pytest.mark.parametrize('scope', ['layer', 'global'])
def test_magnitude_drops_the_smallest_weights_per_layer_or_overall(scope):
  model = tiny_model(scan=True)
  variables = init(model)
  config = PruneConfig(method='magnitude', sparsity=0.6, scope=scope)
  _, pruned = prune.prune(model, variables, config)
  _, masks = prune.masked_model(model, config)
  before, after = (jax.tree.leaves(tree.select(v['params'], masks)) for v in (variables, pruned))
  if scope == 'layer':  # Under scan_layers, each layer's slice of the stacked kernel.
    matrices = [(b[i], a[i]) for b, a in zip(before, after) for i in range(b.shape[0])]
  else:
    matrices = [(np.concatenate([np.ravel(b) for b in before]),
                 np.concatenate([np.ravel(a) for a in after]))]
  for b, a in matrices:
    b, a = np.asarray(b), np.asarray(a)
    assert np.count_nonzero(a) == round(0.4 * a.size)
    np.testing.assert_array_equal(a[a != 0], b[a != 0])
    assert np.abs(b[a == 0]).max() <= np.abs(b[a != 0]).min()
  if scope == 'global':  # One threshold: the layers' own sparsities differ.
    per_kernel = {round(1 - np.count_nonzero(a) / a.size, 2) for a in after}
    assert len(per_kernel) > 1, per_kernel


def test_the_gradual_schedule_is_zhu_and_gupta_cubic():
  config = PruneConfig(method='magnitude', sparsity=0.8, initial_sparsity=0.1,
                       schedule='gradual', begin_step=10, end_step=50, every_steps=15)
  steps = np.arange(0, 60)
  due = [int(s) for s in steps if prune.updates_at(config, jnp.int32(s))]
  assert due == [10, 25, 40, 50]
  for s in due:
    expected = 0.8 + (0.1 - 0.8) * (1 - (s - 10) / 40) ** 3
    np.testing.assert_allclose(float(prune.sparsity_at(config, jnp.int32(s))), expected,
                               rtol=1e-6)
  one_shot = PruneConfig(method='magnitude', begin_step=3)
  assert [int(s) for s in steps if prune.updates_at(one_shot, jnp.int32(s))] == [3]


GRADUAL = {'prune.method': 'magnitude', 'prune.sparsity': 0.75, 'prune.schedule': 'gradual',
           'prune.begin_step': 2, 'prune.end_step': 6, 'prune.every_steps': 2}


def named(values: dict) -> dict[str, np.ndarray]:
  return {name: np.asarray(leaf) for name, leaf in zip(tree.names(values), jax.tree.leaves(values))}


def restored_state(config, workdir, step):
  run = experiment.build(config, str(workdir), same_split=True, train_tokenizer=False)
  tx, _ = experiment.make_optimizer(config)
  mesh = sharding.make_mesh(config.mesh)
  with sharding.use_mesh(mesh, config.mesh.rules):
    layout = train_state.make_layout(run.model, tx, mesh, config.mesh.rules, config.seq_len,
                                     run.trainable)
    state, _ = run.checkpointer.restore(step, layout)
  run.checkpointer.close()
  return state


def test_pruned_weights_and_their_moments_stay_zero_and_a_resumed_run_keeps_its_masks(
    tmp_path, monkeypatch):
  config = tiny_config(tmp_path, total_steps=10, checkpoint_every_steps=4, **GRADUAL)
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  state_4, state_10 = (restored_state(config, tmp_path / 'straight', s) for s in (4, 10))
  masks = state_10.masks
  assert set(tree.names(masks)) == {f'layers_{i}/{m}/kernel' for i in range(2) for m in (
      'attn/query', 'attn/key', 'attn/value', 'attn/out', 'mlp/up', 'mlp/gate', 'mlp/down')}
  adam = state_10.opt_state[1][0]  # After the gradient clipping.
  masks_4 = named(state_4.masks)
  for name, mask in named(masks).items():
    assert mask.sum() == round(0.25 * mask.size), name  # The last update reached 0.75.
    assert not np.any(mask & ~masks_4[name]), name  # Pruned stays pruned as sparsity grows.
    for values in (state_10.trainable, adam.mu, adam.nu):  # Four steps after the last update.
      value = named(tree.select(values, masks))[name].reshape(mask.shape)
      assert np.all(value[~mask] == 0), name
      assert np.count_nonzero(value[mask]) == mask.sum(), name  # The kept ones still train.
  # Interrupted at step 3 (between two mask updates) and resumed: the same run.
  train_preempted_and_resumed(config, tmp_path / 'resumed', monkeypatch, 3)
  assert ([r['train/loss'] for r in read_metrics(tmp_path / 'straight')] ==
          [r['train/loss'] for r in read_metrics(tmp_path / 'resumed')])
  resumed = restored_state(config, tmp_path / 'resumed', 10)
  assert jax.tree.all(jax.tree.map(np.array_equal, resumed.masks, masks))
  # Readers need no masks: the run's config without pruning loads the zeroed kernels.
  unpruned = override(ml_collections.ConfigDict(config.to_dict()), **{'prune.method': 'none'})
  model, variables, _ = sample.load(unpruned, str(tmp_path / 'straight'))
  assert prune.MASKS not in variables
  assert jax.tree.all(jax.tree.map(np.array_equal, variables['params'], state_10.trainable))


@pytest.mark.parametrize('method, kv_heads', [('heads', 2), ('heads', 4), ('ffn', 2)])
@pytest.mark.parametrize('importance', ['norm', 'taylor'])
def test_a_structured_pruned_model_computes_what_the_zeroed_full_model_does(method, kv_heads,
                                                                          importance):
  model = tiny_model(num_kv_heads=kv_heads, qkv_bias=True, mlp_bias=True)
  variables = jax.tree.map(lambda x: x + 0.01, init(model))  # Non-zero biases too.
  config = PruneConfig(method=method, sparsity=0.5, importance=importance)
  grads = None
  if importance == 'taylor':
    ids = tokens((4, 17))
    grads = prune.loss_gradients(model, variables, [
        {'inputs': ids[:, :-1], 'targets': ids[:, 1:]}])
  scores = prune.importance(model.cfg, variables['params'], config, grads)
  kept = prune.units_kept(model.cfg, config, scores)
  smaller, small_variables = prune.shrink(model, variables, config, kept)
  expected = {'heads': dict(num_heads=2, num_kv_heads=2 if kv_heads == 4 else kv_heads),
              'ffn': dict(d_ff=64)}[method]
  assert {k: getattr(smaller.cfg, k) for k in expected} == expected
  assert smaller.cfg == dataclasses.replace(model.cfg, **expected)
  if method == 'heads' and kv_heads == 2:  # GQA: the same number of query heads per kv group.
    assert np.all(np.asarray(kept) // 2 == [0, 1])
  # The smaller variables are the shapes its own init makes.
  assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape, small_variables,
                                   init(smaller)))
  ids = tokens((2, 12), seed=3)
  zeroed = prune.zero_pruned_units(model, variables, config, kept)
  np.testing.assert_allclose(smaller.apply(small_variables, ids), model.apply(zeroed, ids),
                             atol=2e-5, rtol=1e-5)
  assert not np.allclose(model.apply(variables, ids), model.apply(zeroed, ids), atol=1e-3)
  pruned_model, pruned = prune.prune(model, variables, config, grads)
  assert pruned_model.cfg == smaller.cfg
  assert jax.tree.all(jax.tree.map(np.array_equal, pruned, small_variables))


def test_structured_pruning_keeps_the_most_important_units():
  model = tiny_model()
  variables = init(model)
  up = variables['params']['layers_1']['mlp']['up']['kernel']
  variables['params']['layers_1']['mlp']['up']['kernel'] = up.at[:, 7].multiply(100.0)
  config = PruneConfig(method='ffn', sparsity=0.99)  # Keeps one channel per layer.
  scores = prune.importance(model.cfg, variables['params'], config)
  kept = prune.units_kept(model.cfg, config, scores)
  assert kept.shape == (2, 1) and int(kept[1, 0]) == 7


@pytest.mark.parametrize('method, sparsity, kept', [('ffn', 0.75, 16), ('heads', 0.5, 2)])
def test_gradual_structured_pruning_zeroes_whole_units_and_shrinks_to_the_same_model(
    tmp_path, method, sparsity, kept):
  config = tiny_config(tmp_path, total_steps=10, **{
      'model.num_heads': 4, 'model.num_kv_heads': 2, 'prune.method': method,
      'prune.sparsity': sparsity, 'prune.schedule': 'gradual', 'prune.begin_step': 2,
      'prune.end_step': 6, 'prune.every_steps': 2})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  state = restored_state(config, workdir, 10)
  unit_kernels = UNIT_KERNELS[method]
  assert set(tree.names(state.masks)) == {f'layers_{i}/{module}/kernel' for i in range(2)
                                          for module, _, _ in unit_kernels}
  for i in range(2):
    layer, masks = state.trainable[f'layers_{i}'], state.masks[f'layers_{i}']
    units = []
    for module, _, axis in unit_kernels:
      path = module.split('/')
      kernel, mask = prune._get(layer, (*path, 'kernel')), prune._get(masks, (*path, 'kernel'))
      mask = np.asarray(mask).reshape(kernel.shape)
      others = tuple(d for d in range(kernel.ndim) if d != axis)
      np.testing.assert_array_equal(mask.all(axis=others), mask.any(axis=others))  # Whole units.
      units.append(mask.any(axis=others))
      assert np.all(np.asarray(kernel)[~mask] == 0) and np.all(np.asarray(kernel)[mask] != 0)
    assert all(np.array_equal(u, units[0]) for u in units), units  # A unit's every kernel.
    assert units[0].sum() == kept
    if method == 'heads':  # As many heads in each kv group.
      assert units[0].reshape(2, 2).sum(axis=1).tolist() == [1, 1]
  # The trained run, read without masks, shrinks to the smaller model computing the same logits.
  unpruned = override(ml_collections.ConfigDict(config.to_dict()), **{'prune.method': 'none'})
  model, variables, _ = sample.load(unpruned, workdir)
  smaller, small_variables = prune.prune(model, variables,
                                         PruneConfig(method=method, sparsity=sparsity))
  assert smaller.cfg == dataclasses.replace(model.cfg, **{'heads': dict(num_heads=kept),
                                                          'ffn': dict(d_ff=kept)}[method])
  ids = tokens((2, 12), seed=3)
  np.testing.assert_allclose(smaller.apply(small_variables, ids), model.apply(variables, ids),
                             atol=2e-5, rtol=1e-5)


def test_a_structured_pruned_model_exports_to_hugging_face(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from lepton_jax import hf  # pylint: disable=g-import-not-at-top  (the hf extra)
  model = tiny_model()
  fewer_heads, variables = prune.prune(model, init(model), PruneConfig(method='heads'))
  smaller, variables = prune.prune(fewer_heads, variables, PruneConfig(method='ffn',
                                                                       sparsity=0.25))
  assert (smaller.cfg.num_heads, smaller.cfg.num_kv_heads, smaller.cfg.d_ff) == (2, 2, 96)
  hf.save(smaller, variables, str(tmp_path / 'hf'))
  ids = tokens((2, 12))
  reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf')
  with torch.no_grad():
    expected = reference(torch.tensor(np.asarray(ids))).logits.numpy()
  np.testing.assert_allclose(smaller.apply(variables, ids), expected, atol=1e-4)


def run_config_file(config, path) -> str:
  path.write_text('import ml_collections\n\n\ndef get_config():\n'
                  f'  return ml_collections.ConfigDict({config.to_dict()!r})\n')
  return str(path)


def prune_script(*args):
  return subprocess.run([sys.executable, 'scripts/prune.py', '--cpu_devices=2', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_the_script_writes_a_smaller_model_that_loads_and_fine_tunes(tmp_path):
  config = tiny_config(tmp_path, total_steps=10, **{'model.d_ff': 64})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  out = tmp_path / 'half_ffn'
  args = (f'--config={run_config_file(config, tmp_path / "run_config.py")}',
          f'--workdir={workdir}')
  result = prune_script(*args, f'--out={out}', '--config.prune.method=ffn',
                        '--config.prune.importance=taylor', '--config.prune.importance_batches=2')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'Wrote' in result.stdout
  # OUT brings its own model: the run's config loads it as the smaller model.
  model, variables, _ = sample.load(config, str(out))
  assert model.cfg.d_ff == 32
  assert variables['params']['layers_0']['mlp']['down']['kernel'].shape == (32, 32)
  # A config that sets d_ff must set the pruned one (pretrained.resolve refuses a contradiction).
  fine_tune = tiny_config(tmp_path, total_steps=2, init_from=f'workdir:{out}',
                          **{'model.d_ff': 32})
  metrics = train.train_and_evaluate(fine_tune, str(tmp_path / 'fine_tuned'))
  assert np.isfinite(metrics['eval/loss'])
  again = prune_script(*args, f'--out={out}', '--config.prune.method=ffn')
  assert again.returncode != 0 and 'is not empty' in again.stderr
  unset = prune_script(*args, f'--out={tmp_path / "other"}')
  assert unset.returncode != 0 and "config.prune.method='none' prunes nothing" in unset.stderr


@pytest.mark.parametrize('overrides, message', [
    ({'prune.method': 'magnitude', 'prune.sparsity': -0.1},
     r'^config.prune.sparsity=-0.1: must be in \[0, 1\)$'),
    ({'prune.method': 'magnitude', 'prune.sparsity': 1.0},
     r'^config.prune.sparsity=1.0: must be in \[0, 1\)$'),
    ({'prune.method': 'n:m', 'prune.n': 5, 'prune.m': 4},
     r'^config.prune.n=5 with config.prune.m=4: n:m keeps n of every m weights, so 0 < n <= m$'),
    ({'prune.method': 'n:m', 'prune.n': 2, 'prune.m': 3},
     r'^config.prune.m=3 does not divide the 32 inputs of layers_0/attn/key$'),
    ({'prune.method': 'n:m', 'prune.schedule': 'gradual'}, r"^config.prune.schedule='gradual'"),
    ({'prune.method': 'magnitude', 'prune.schedule': 'gradual'},
     r'^config.prune.begin_step=0, end_step=0, every_steps=100: gradual pruning needs'),
    ({'prune.method': 'heads', 'prune.importance': 'taylor'},
     r"^config.prune.importance='taylor': lepton-train ranks units by their norm"),
    ({'prune.method': 'magnitude', 'prune.layers': ('nothing',)},
     r"^config.prune.layers=\('nothing',\): matches no Dense layer$"),
    ({'prune.method': 'magnitude', 'trainable': (r'layers_1/.*', 'embed/.*', 'head/.*')},
     r'^config.prune: params/layers_0/attn/key/kernel is masked but frozen'),
    ({'prune.method': 'lottery'}, r"^config.prune.method='lottery': expected one of"),
])
def test_bad_prune_configs_are_one_line_errors(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(tmp_path, **overrides), str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()
