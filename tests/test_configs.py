"""Every shipped config validates, and the TPU-scale one builds abstractly with its shardings."""
import importlib
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from lepton_jax import config_lib, sharding, train_state
from lepton_jax.model import ModelConfig, Transformer

CONFIG_NAMES = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent / 'configs').glob('*.py')
                      if p.stem != '__init__')


# Configs whose argument (the weights they start from) has no default.
CONFIG_ARGS = {'finetune_hf': '/path/to/hf_dir', 'lora_hf': '/path/to/hf_dir',
               'sft_hf': '/path/to/hf_dir', 'classify_hf': '/path/to/hf_dir',
               'dpo_hf': '/path/to/hf_dir',
               'lora_stdlib': '/path/to/workdir', 'lora_adapt': '/path/to/workdir',
               'classify_stdlib': '/path/to/workdir,TASK_DIR',
               'sft_reasoning': '/path/to/workdir,TASK_DIR',
               'dpo_reasoning': '/path/to/workdir,TASK_DIR'}


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_config_validates(name, tmp_path):
  (tmp_path / 'labels.json').write_text('["email", "json"]')  # What stdlib_functions.py writes.
  arg = CONFIG_ARGS.get(name, '').replace('TASK_DIR', str(tmp_path)) or None
  config_lib.validate(importlib.import_module(f'configs.{name}').get_config(arg))


@pytest.mark.parametrize('name', sorted(CONFIG_ARGS))
def test_configs_that_start_from_weights_need_their_source(name):
  with pytest.raises(ValueError, match=f'configs/{name}.py needs the'):
    importlib.import_module(f'configs.{name}').get_config()


def test_ablation_cpu_names_the_arguments_it_takes():
  config = importlib.import_module('configs.ablation_cpu').get_config('val_full')
  assert config.evals.val_full.every == config.total_steps  # Scored once, at the last step.
  assert 'val_full' not in importlib.import_module('configs.ablation_cpu').get_config().evals
  with pytest.raises(ValueError, match=r"configs/ablation_cpu.py: argument 'full'; it takes one "
                                       r"of \('', 'val_full'\)"):
    importlib.import_module('configs.ablation_cpu').get_config('full')


@pytest.mark.parametrize('name,arg,chips', [
    ('llama_1b', 'v5e-16', 16), ('llama_1b', 'v5p-8', 4), ('llama_1b', 'v5e-256', 256),
    ('llama2_7b', 'v5p-128', 64), ('llama2_7b', 'v5p-256', 128), ('llama2_7b', 'v5e-256', 256)])
def test_tpu_slices_fill_their_chips(name, arg, chips):
  config = importlib.import_module(f'configs.{name}').get_config(arg)
  assert sharding.mesh_shape(config.mesh, chips)
  assert config.batch_size % (config.mesh.data * config.mesh.fsdp) == 0


def test_llama_1b_builds_abstractly_and_shards_over_fsdp():
  config = importlib.import_module('configs.llama_1b').get_config('v5e-16')
  config.mesh.update(data=1, fsdp=8, tensor=1)  # The 8 simulated devices stand in for the slice.
  model = Transformer(ModelConfig.from_config(config.model))
  mesh = sharding.make_mesh(config.mesh)
  with sharding.use_mesh(mesh, config.mesh.rules):
    abstract, shardings = train_state.abstract_variables(model, mesh, config.mesh.rules,
                                                         config.seq_len)
  num_params = sum(x.size for x in jax.tree.leaves(abstract['params']))
  assert 1.0e9 < num_params < 1.3e9
  up = lambda tree: tree['params']['layers']['mlp']['up']['kernel']
  assert up(abstract).shape == (22, 2048, 5632)  # scanned
  assert up(shardings).spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')
  per_device_bytes = sum(
      math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
      for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
  assert per_device_bytes < 4 * num_params / 8 * 1.01
  logits = jax.eval_shape(model.apply, abstract,
                          jax.ShapeDtypeStruct((2, config.seq_len), jnp.int32))
  assert logits.shape == (2, config.seq_len, config.model.vocab_size)


def test_llama2_7b_has_llama2_7b_parameter_count():
  config = importlib.import_module('configs.llama2_7b').get_config()
  model = Transformer(ModelConfig.from_config(config.model))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  assert sum(x.size for x in jax.tree.leaves(nn.unbox(shapes))) == 6_738_415_616  # HF Llama-2-7b
