"""Variables beyond params: path patterns, the trainable/frozen split, params-only restore onto
any mesh from any optimizer, the checkpoint's description of the variables, and checkpoints
written before that description existed."""
import functools
import os
import re

import flax.struct
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lepton_jax import checkpoint, data, optim, sample, sharding, steps, train, train_state, tree
from lepton_jax.model import ModelConfig, Transformer
from tests.conftest import read_metrics, tiny_config

# Attention and MLP of the second layer, and the output head, train; the rest is frozen.
PARTLY_FROZEN = {'trainable': ('layers_1/.*', 'head/kernel')}


def test_patterns_match_whole_names_and_partition_inverts_merge():
  params = {'attn': {'query': {'kernel': 1, 'scale': 2}}, 'attn_norm': {'scale': 3},
            'embed': {'embedding': 4}}
  assert tree.names(params) == ['attn/query/kernel', 'attn/query/scale', 'attn_norm/scale',
                                'embed/embedding']
  mask = tree.mask(params, ('.*/kernel', 'embed/.*'))
  assert mask == {'attn': {'query': {'kernel': True, 'scale': False}},
                  'attn_norm': {'scale': False}, 'embed': {'embedding': True}}
  assert tree.mask(params, ('kernel',)) == jax.tree.map(lambda _: False, params)  # Whole names.
  chosen, rest = tree.partition(params, mask)
  assert chosen == {'attn': {'query': {'kernel': 1}}, 'embed': {'embedding': 4}}
  assert tree.merge(chosen, rest) == params
  assert tree.partition(params, jax.tree.map(lambda _: True, params)) == (params, {})
  with pytest.raises(ValueError, match="config.trainable: pattern 'layer_1/.*' matches no "
                     "parameter; names look like 'attn/query/kernel'"):
    tree.mask(params, ('layer_1/.*',), what='config.trainable')


def test_weight_decay_is_chosen_by_path_not_leaf_name():
  # An int8 weight's `scale` sits beside its kernel; a norm's `scale` is a norm's.
  params = {'attn': {'query': {'kernel': 0., 'scale': 0.}}, 'attn_norm': {'scale': 0.},
            'mlp': {'up': {'kernel': 0., 'bias': 0.}}, 'embed': {'embedding': 0.},
            'pos_embedding': 0.}
  assert tree.names(optim.decay_mask(params, decay_embeddings=False)) == tree.names(params)
  decayed = lambda embeddings: {name for name, on in zip(
      tree.names(params), jax.tree.leaves(optim.decay_mask(params, embeddings))) if on}
  assert decayed(False) == {'attn/query/kernel', 'mlp/up/kernel'}
  assert decayed(True) == {'attn/query/kernel', 'mlp/up/kernel', 'embed/embedding',
                           'pos_embedding'}


def layout_of(config) -> train_state.Layout:
  model = Transformer(ModelConfig.from_config(config.model))
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  mesh = sharding.make_mesh(config.mesh)
  with sharding.use_mesh(mesh, config.mesh.rules):
    return train_state.make_layout(model, tx, mesh, config.mesh.rules, config.seq_len,
                                   config.trainable)


def initial_variables(config) -> dict:
  """The variables a fresh run of `config` starts from (init is a function of the seed)."""
  model = Transformer(ModelConfig.from_config(config.model))
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  layout = layout_of(config)
  state, frozen = train_state.init_state(model, tx, config.seed, config.seq_len, layout)
  return steps.model_variables(state.trainable, frozen)


def test_frozen_variables_get_no_gradient_or_optimizer_state_and_never_change(tmp_path):
  config = tiny_config(tmp_path, total_steps=6, batch_size=16, grad_accum_steps=2,
                       **{'model.vocab_size': 257, **PARTLY_FROZEN})
  layout = layout_of(config)
  frozen_names = set(tree.names(layout.frozen))
  assert {'params/layers_0/attn/query/kernel', 'params/embed/embedding',
          'params/layers_0/attn_norm/scale', 'params/final_norm/scale'} <= frozen_names
  assert tree.names(layout.state.trainable) == [
      'head/kernel', 'layers_1/attn/key/kernel', 'layers_1/attn/out/kernel',
      'layers_1/attn/query/kernel', 'layers_1/attn/value/kernel', 'layers_1/attn_norm/scale',
      'layers_1/mlp/down/kernel', 'layers_1/mlp/gate/kernel', 'layers_1/mlp/up/kernel',
      'layers_1/mlp_norm/scale']
  # AdamW's moments (and the clip and schedule counters) exist for trainable params alone.
  moment_names = {re.split('/(?:mu|nu)/', name)[1] for name in tree.names(layout.state.opt_state)
                  if re.search('/(mu|nu)/', name)}
  assert moment_names == set(tree.names(layout.state.trainable))

  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir))
  records = read_metrics(workdir)
  assert records[-1]['train/loss'] < records[0]['train/loss']
  before, after = initial_variables(config), sample.load(config, str(workdir))[1]
  for name, a, b in zip(tree.names(before), jax.tree.leaves(before), jax.tree.leaves(after)):
    if name in frozen_names:
      np.testing.assert_array_equal(a, b, err_msg=name)
    else:
      assert np.any(np.asarray(a) != np.asarray(b)), name
  # Written once, beside the step checkpoints, which hold the trainable params alone.
  assert (workdir / 'frozen').is_dir()
  saved = ocp.PyTreeCheckpointHandler().metadata(workdir / 'checkpoints' / '6' / 'state').tree
  assert tree.names(saved['trainable']) == tree.names(layout.state.trainable)


def test_partly_frozen_run_resumes_exactly_and_refuses_another_split(tmp_path, monkeypatch):
  config = tiny_config(tmp_path, total_steps=8, **PARTLY_FROZEN)
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  interrupted = tmp_path / 'interrupted'
  monkeypatch.setattr(train.PreemptionWatch, 'reached', lambda self, step: step == 3)
  train.train_and_evaluate(config, str(interrupted))
  monkeypatch.undo()

  other_split = tiny_config(tmp_path, total_steps=8, trainable=('layers_.*', 'head/kernel'))
  with pytest.raises(ValueError, match=r'step 3\) of a different model: params/layers_0/attn/key/'
                     r'kernel is frozen in the checkpoint but trainable under config.trainable'):
    train.train_and_evaluate(other_split, str(interrupted))
  train.train_and_evaluate(config, str(interrupted))
  straight, resumed = read_metrics(tmp_path / 'straight'), read_metrics(interrupted)
  assert [r['train/loss'] for r in straight] == [r['train/loss'] for r in resumed]


SHARDABLE = {'model.vocab_size': 264, 'model.num_heads': 4, 'model.num_kv_heads': 4,
             'model.head_dim': 8}


def eval_loss(config, model, variables, tokenizer) -> float:
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model))
  sums = [eval_fn(variables, batch) for batch in data.make_eval_batches(config, tokenizer, 0, 1)]
  return sum(float(s['loss_sum']) for s in sums) / sum(float(s['tokens']) for s in sums)


def test_params_alone_restore_from_another_optimizer_onto_another_mesh(tmp_path):
  workdir = str(tmp_path / 'run')
  trained_with = tiny_config(tmp_path, total_steps=10, **SHARDABLE,
                             **{'optimizer.name': 'adafactor', 'optimizer.learning_rate': 3e-2})
  train.train_and_evaluate(trained_with, workdir)
  # Another optimizer (no Adam moments in the checkpoint) and a tensor-parallel mesh.
  read_with = tiny_config(tmp_path, total_steps=10, **SHARDABLE,
                          **{'mesh.data': 1, 'mesh.fsdp': 4, 'mesh.tensor': 2})
  model, variables, tokenizer = sample.load(read_with, workdir)
  query = variables['params']['layers_0']['attn']['query']['kernel']
  assert tuple(query.sharding.spec) == ('fsdp', 'tensor', None)
  assert query.sharding.mesh.shape == {'data': 1, 'fsdp': 4, 'tensor': 2}
  logged = [r['eval/loss'] for r in read_metrics(workdir) if 'eval/loss' in r][-1]
  assert eval_loss(read_with, model, variables, tokenizer) == pytest.approx(logged, rel=1e-5)


@flax.struct.dataclass
class Format1State:
  """The train state as checkpoints before format 2 held it."""
  step: jax.Array
  params: dict
  opt_state: dict
  rng: jax.Array


def write_format1_checkpoint(workdir, step: int, state: train_state.TrainState, data_iterator,
                             model_config) -> None:
  """What lepton_jax wrote before its checkpoints described their variables: the state with
  `params`, and `meta` holding the model config's shape fields."""
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  options=ocp.CheckpointManagerOptions(create=True))
  old_state = Format1State(step=state.step, params=state.trainable, opt_state=state.opt_state,
                           rng=state.rng)
  shape_fields = {k: model_config[k] for k in ('vocab_size', 'd_model', 'num_layers')}
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(old_state), data=grain.checkpoint.CheckpointSave(data_iterator),
      meta=ocp.args.JsonSave(shape_fields)))
  manager.wait_until_finished()
  manager.close()


def test_checkpoints_of_format_1_restore_resume_and_are_checked(tmp_path):
  config = tiny_config(tmp_path, total_steps=6)
  new_format = tmp_path / 'new'
  train.train_and_evaluate(tiny_config(tmp_path, total_steps=3), str(new_format))
  layout = layout_of(tiny_config(tmp_path, **{'model.vocab_size': 257}))  # 257 bytes + EOS.
  state, _ = checkpoint.Checkpointer(str(new_format), keep=3).restore(3, layout)
  old = tmp_path / 'old'
  data_iterator = data.make_train_iterator(config, data.build_tokenizer(config.data, str(old)),
                                           0, 1)
  [next(data_iterator) for _ in range(3)]
  write_format1_checkpoint(str(old), 3, state, data_iterator, config.model)

  variables = sample.load(config, str(old))[1]
  for a, b in zip(jax.tree.leaves(variables['params']), jax.tree.leaves(state.trainable)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=r'params/layers_2/attn/key/kernel is in the model but not '
                     r'in the checkpoint'):
    train.train_and_evaluate(tiny_config(tmp_path, total_steps=6, **{'model.num_layers': 3}),
                             str(old))
  train.train_and_evaluate(config, str(old))  # Resumes at step 3 and checkpoints in format 2.
  train.train_and_evaluate(tiny_config(tmp_path, total_steps=6), str(new_format))
  assert ([r['train/loss'] for r in read_metrics(old)] ==
          [r['train/loss'] for r in read_metrics(new_format)][3:])
