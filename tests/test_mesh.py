"""Mesh shapes (including multi-slice DCN x ICI) and the shipped logical-axis rule sets."""
from jax.sharding import PartitionSpec as P
import pytest

from lepton_jax import config_lib, sharding, train_state
from lepton_jax.model import ModelConfig, Transformer


def mesh_config(**sizes):
  config = config_lib.base_config().mesh
  config.update(sizes)
  return config


@pytest.mark.parametrize('sizes,num_devices,ici,dcn', [
    (dict(), 8, (8, 1, 1), (1, 1, 1)),
    (dict(data=1, fsdp=-1, tensor=2), 16, (1, 8, 2), (1, 1, 1)),
    (dict(data=1, fsdp=-1, dcn_data=4), 64, (1, 16, 1), (4, 1, 1)),  # 4 slices of 16 chips
    (dict(data=-1, fsdp=4, dcn_fsdp=2), 32, (4, 4, 1), (1, 2, 1)),
])
def test_hybrid_mesh_shapes(sizes, num_devices, ici, dcn):
  assert sharding.hybrid_mesh_shapes(mesh_config(**sizes), num_devices) == (ici, dcn)


def test_slices_that_do_not_divide_the_devices_are_refused():
  with pytest.raises(ValueError, match=r'8 devices do not split into 3 slices'):
    sharding.hybrid_mesh_shapes(mesh_config(dcn_data=3), 8)
  with pytest.raises(ValueError, match=r'dcn_\* sizes must be given'):
    sharding.hybrid_mesh_shapes(mesh_config(dcn_data=-1), 8)


@pytest.mark.parametrize('rules,mesh,up_spec,out_spec,batch_spec', [
    ('fsdp', dict(data=1, fsdp=8), P('fsdp', None), P(None, None, 'fsdp'), P(('data', 'fsdp'))),
    ('tensor', dict(data=2, tensor=4), P(None, 'tensor'), P('tensor', None, None), P('data')),
    ('fsdp_tensor', dict(data=1, fsdp=4, tensor=2), P('fsdp', 'tensor'), P('tensor', None, 'fsdp'),
     P(('data', 'fsdp'))),
])
def test_rule_sets_place_column_and_row_splits(rules, mesh, up_spec, out_spec, batch_spec):
  """Megatron: MLP up is column-split, attention out row-split; FSDP splits 'embed'."""
  config = config_lib.base_config()
  config.model.vocab_size = 128
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  config.mesh.update(mesh)
  config.mesh.rules = config_lib.RULE_SETS[rules]
  model = Transformer(ModelConfig.from_config(config.model))
  device_mesh = sharding.make_mesh(config.mesh)
  with sharding.use_mesh(device_mesh, config.mesh.rules):
    _, shardings = train_state.abstract_variables(model, device_mesh, config.mesh.rules, 16)
  layer = shardings['params']['layers_0']
  assert layer['mlp']['up']['kernel'].spec == up_spec
  assert layer['attn']['out']['kernel'].spec == out_spec
  assert sharding.batch_sharding(device_mesh, config.mesh.rules).spec[0] == batch_spec[0]
