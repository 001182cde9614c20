"""Sharded training: the same losses on every mesh, 1/N state under FSDP, params placed by the
rules, resharding on restore, and one-line errors for meshes and shapes that cannot work."""
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from lepton_jax import config_lib, optim, sharding, train, train_state
from lepton_jax.model import ModelConfig, Transformer
from tests.conftest import read_metrics, tiny_config

STEPS = 4
REPO = pathlib.Path(__file__).parent.parent
MESHES = {
    'data8': dict(data=8, fsdp=1, tensor=1),
    'fsdp8': dict(data=1, fsdp=8, tensor=1),
    'fsdp4_tensor2': dict(data=1, fsdp=4, tensor=2),
    'data2_fsdp2_tensor2': dict(data=2, fsdp=2, tensor=2),
}


def sharded_config(tmp_path, mesh: dict, **overrides):
  """tiny_config with every dimension divisible by 8: 4 heads and 4 KV heads, vocab padded from
  the byte tokenizer's 257 to 264."""
  model = {'model.vocab_size': 264, 'model.num_heads': 4, 'model.num_kv_heads': 4,
           'model.head_dim': 8}
  config = tiny_config(tmp_path, total_steps=STEPS, **model, **overrides)
  config.mesh.update(mesh)
  return config


def losses(workdir) -> list[float]:
  """Every logged train loss, then the final eval loss."""
  records = read_metrics(workdir)
  return [r['train/loss'] for r in records] + [records[-1]['eval/loss']]


def train_losses(tmp_path, mesh: dict, name: str) -> list[float]:
  workdir = pathlib.Path(tmp_path) / name
  train.train_and_evaluate(sharded_config(pathlib.Path(tmp_path), mesh), str(workdir))
  return losses(workdir)


def single_device_losses(tmp_path) -> list[float]:
  """The same run in a fresh process that sees one CPU device: the 8-device pytest process cannot
  un-simulate its devices, and a 1-device mesh cut from them would still be an 8-device process."""
  code = ('import json, sys; from tests import test_sharding as t; '
          'print(json.dumps(t.train_losses(sys.argv[1], dict(data=1, fsdp=1, tensor=1), "one")))')
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
         'JAX_PLATFORMS': 'cpu', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'JAX_COMPILATION_CACHE_DIR': os.path.join(tempfile.gettempdir(),
                                                   'lepton_jax_test_xla_cache')}
  result = subprocess.run([sys.executable, '-c', code, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_mesh_and_one_device_give_the_same_losses(tmp_path):
  reference = train_losses(tmp_path, MESHES['data8'], 'data8')
  assert len(reference) == STEPS + 1
  for name, mesh in MESHES.items():
    if name != 'data8':
      np.testing.assert_allclose(train_losses(tmp_path, mesh, name), reference, rtol=1e-5,
                                 err_msg=name)
  np.testing.assert_allclose(single_device_losses(tmp_path), reference, rtol=1e-5,
                             err_msg='one device')


def initial_state(config):
  """A freshly initialised, sharded TrainState for `config` on the 8 devices."""
  mesh = sharding.make_mesh(config.mesh)
  model = Transformer(ModelConfig.from_config(config.model))
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  with sharding.use_mesh(mesh, config.mesh.rules):
    layout = train_state.make_layout(model, tx, mesh, config.mesh.rules, config.seq_len,
                                     config.trainable)
    return train_state.init_state(model, tx, config.seed, config.seq_len, layout)[0]


def bytes_per_device(tree) -> dict[jax.Device, int]:
  """What each device holds of a tree of arrays, from its addressable shards."""
  held = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held


def per_device_bytes(config, mesh: dict) -> int:
  config.mesh.update(mesh)
  held = bytes_per_device(initial_state(config))
  assert len(held) == 8 and len(set(held.values())) == 1, (mesh, held)
  return max(held.values())


def test_fsdp_splits_params_and_optimizer_state_evenly(tmp_path):
  config = sharded_config(tmp_path, MESHES['data8'])
  replicated = per_device_bytes(config, MESHES['data8'])
  for fsdp in (2, 4, 8):
    # Only the step, the rng and the optimizer's step count stay replicated: a few bytes.
    held = per_device_bytes(config, dict(data=8 // fsdp, fsdp=fsdp, tensor=1))
    assert held == pytest.approx(replicated / fsdp, rel=1e-3), fsdp
  # Norm scales have no 'tensor' dimension: they split 4 ways, the rest 8 ways.
  held = per_device_bytes(config, MESHES['fsdp4_tensor2'])
  assert held == pytest.approx(replicated / 8, rel=1e-2)


def test_params_are_placed_by_the_rules(tmp_path):
  state = initial_state(sharded_config(tmp_path, MESHES['fsdp4_tensor2']))
  layer = state.trainable['layers_0']
  specs = {
      'up': (layer['mlp']['up']['kernel'], ('fsdp', 'tensor')),  # Column split.
      'down': (layer['mlp']['down']['kernel'], ('tensor', 'fsdp')),  # Row split.
      'query': (layer['attn']['query']['kernel'], ('fsdp', 'tensor', None)),
      'out': (layer['attn']['out']['kernel'], ('tensor', None, 'fsdp')),
      'embedding': (state.trainable['embed']['embedding'], ('tensor', 'fsdp')),
  }
  for name, (kernel, spec) in specs.items():
    assert tuple(kernel.sharding.spec) == spec, name
  up = layer['mlp']['up']['kernel']
  assert up.addressable_shards[0].data.shape == (32 // 4, 64 // 2)
  moment = state.opt_state[1][0].mu['layers_0']['mlp']['up']['kernel']
  assert moment.sharding == up.sharding


def test_restore_onto_a_different_mesh_continues_the_run(tmp_path, monkeypatch):
  straight = train_losses(tmp_path, MESHES['fsdp8'], 'straight')

  interrupted = tmp_path / 'interrupted'
  monkeypatch.setattr(train.PreemptionWatch, 'reached', lambda self, step: step == 2)
  train.train_and_evaluate(sharded_config(tmp_path, MESHES['fsdp8']), str(interrupted))
  assert os.listdir(interrupted / 'checkpoints') == ['2']
  monkeypatch.undo()
  train.train_and_evaluate(sharded_config(tmp_path, dict(data=2, fsdp=1, tensor=4)),
                           str(interrupted))
  np.testing.assert_allclose(losses(interrupted), straight, rtol=1e-5)


def with_rule(logical: str, mesh_axes):
  return tuple((name, mesh_axes if name == logical else axes)
               for name, axes in config_lib.DEFAULT_RULES)


@pytest.mark.parametrize('overrides, mesh, message', [
    ({}, dict(data=3, fsdp=1, tensor=1),
     r"axis sizes \{'data': 3, 'fsdp': 1, 'tensor': 1\} multiply to 3, but there are 8 devices"),
    ({}, dict(data=-1, fsdp=3, tensor=1), r'cannot fill 8 devices \(8 is not divisible by 3\)'),
    ({}, dict(data=8, fsdp=1, tensor=1, rules=with_rule('mlp', 'model')),
     r"logical axis 'mlp' maps to unknown mesh axis 'model'"),
    ({}, dict(data=1, fsdp=1, tensor=8),
     r"\['attn'\]\['key'\]\['kernel'\] of shape \(32, 4, 8\): dimension 4 is not divisible by "
     r"mesh axes \('tensor',\) of size 8"),
    ({'batch_size': 12}, dict(data=2, fsdp=4, tensor=1),
     r'config.batch_size=12 is not divisible by the data-parallel size 8'),
])
def test_bad_meshes_fail_with_one_clear_error(tmp_path, overrides, mesh, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(sharded_config(tmp_path, mesh, **overrides), str(tmp_path / 'run'))
