"""Hugging Face interop against transformers itself: tiny random models of every family, built
locally (nothing downloads), loaded by lepton and written back."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import config_lib, hf, sharding
from lepton_jax.model import ModelConfig, Transformer
from tests.conftest import HF_VOCAB, TINY_HF_MODELS, save_tiny_hf_models

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB = HF_VOCAB
T = 40  # Beyond Mistral's window and Llama 3.1's original_max_position_embeddings here.


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  return save_tiny_hf_models(tmp_path_factory.mktemp('hf'))


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, T))


def hf_logits(path, tokens=TOKENS, **kwargs) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def lepton_logits(model, variables, tokens=TOKENS) -> np.ndarray:
  return np.asarray(model.apply(variables, jnp.asarray(tokens)))


@pytest.mark.parametrize('name', TINY_HF_MODELS)
def test_load_then_save_equals_transformers(hf_dirs, tmp_path, name):
  reference = hf_logits(hf_dirs[name])
  model, variables = hf.load(str(hf_dirs[name]))
  np.testing.assert_allclose(lepton_logits(model, variables), reference, atol=1e-4)

  hf.save(model, variables, str(tmp_path / 'out'))
  np.testing.assert_allclose(hf_logits(tmp_path / 'out'), reference, atol=1e-4)
  saved = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert saved['architectures'] == [hf.read_config(str(hf_dirs[name]))[0].architecture]


def test_llama3_rope_scaling_changes_logits_at_this_length(hf_dirs):
  model, variables = hf.load(str(hf_dirs['llama3.1']))
  unscaled = Transformer(ModelConfig(**{**model.cfg.__dict__, 'rope_scaling': 'none'}))
  assert np.abs(lepton_logits(unscaled, variables) - hf_logits(hf_dirs['llama3.1'])).max() > 1e-3


def test_scanned_layers_on_a_sharded_mesh_load_and_save(hf_dirs, tmp_path):
  assert jax.device_count() == 8
  mesh_config = config_lib.base_config().mesh
  mesh_config.update(data=2, fsdp=2, tensor=2)
  mesh, rules = sharding.make_mesh(mesh_config), mesh_config.rules
  path = hf_dirs['qwen3']
  model, variables = hf.load(str(path), mesh=mesh, rules=rules, scan_layers=True)
  kernel = variables['params']['layers']['attn']['query']['kernel']
  assert kernel.shape == (2, 32, 4, 12) and not kernel.sharding.is_fully_replicated
  tokens = np.concatenate([TOKENS, TOKENS[::-1]])  # The batch splits 4 ways.
  with sharding.use_mesh(mesh, rules):
    np.testing.assert_allclose(lepton_logits(model, variables, tokens), hf_logits(path, tokens),
                               atol=1e-4)
  hf.save(model, variables, str(tmp_path / 'out'))
  np.testing.assert_allclose(hf_logits(tmp_path / 'out'), hf_logits(path), atol=1e-4)


def test_sharded_save_writes_an_index_that_both_sides_load(hf_dirs, tmp_path):
  model, variables = hf.load(str(hf_dirs['llama']))
  hf.save(model, variables, str(tmp_path / 'out'), max_shard_bytes=20_000)
  index = json.loads((tmp_path / 'out' / 'model.safetensors.index.json').read_text())
  files = sorted(set(index['weight_map'].values()))
  assert len(files) > 2 and files[0] == f'model-00001-of-{len(files):05d}.safetensors'
  reference = hf_logits(hf_dirs['llama'])
  np.testing.assert_allclose(hf_logits(tmp_path / 'out'), reference, atol=1e-4)
  reloaded, reloaded_variables = hf.load(str(tmp_path / 'out'))
  np.testing.assert_allclose(lepton_logits(reloaded, reloaded_variables), reference, atol=1e-4)


def test_bfloat16_load(hf_dirs):
  model, variables = hf.load(str(hf_dirs['llama']), dtype='bfloat16')
  assert model.cfg.dtype == 'bfloat16'
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {np.dtype(jnp.bfloat16)}
  logits = lepton_logits(model, variables)
  reference = hf_logits(hf_dirs['llama'], dtype=torch.bfloat16)
  assert logits.dtype == np.float32 and np.abs(logits - reference).max() < 0.05


def test_a_from_scratch_lepton_model_exports_as_llama(tmp_path):
  config = config_lib.base_config().model
  config.update(vocab_size=VOCAB, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                num_layers=2)
  model = Transformer(ModelConfig.from_config(config))
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32)))
  hf.save(model, variables, str(tmp_path / 'out'))
  assert json.loads((tmp_path / 'out' / 'config.json').read_text())['architectures'] == [
      'LlamaForCausalLM']
  np.testing.assert_allclose(hf_logits(tmp_path / 'out'), lepton_logits(model, variables),
                             atol=1e-4)
  assert '| num_kv_heads | 2 |' in (tmp_path / 'out' / 'README.md').read_text()


# Errors: one line naming the file and tensor or field, and nothing written.

def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return dst


def _edit_config(path, **changes):
  config = json.loads((path / 'config.json').read_text())
  config.update(changes)
  (path / 'config.json').write_text(json.dumps(config))


def test_a_directory_without_config_json(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json does not exist'):
    hf.load(str(tmp_path))


def test_an_unsupported_model_type(hf_dirs, tmp_path):
  path = _copy(hf_dirs['llama'], tmp_path / 'm')
  _edit_config(path, model_type='falcon')
  with pytest.raises(ValueError, match="model_type='falcon' is not supported"):
    hf.load(str(path))


@pytest.mark.parametrize('changes, field', [
    ({'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0}},
     'rope_parameters.rope_type'),
    ({'hidden_act': 'gelu'}, 'hidden_act'),
])
def test_a_config_field_lepton_cannot_express(hf_dirs, tmp_path, changes, field):
  path = _copy(hf_dirs['llama'], tmp_path / 'm')
  _edit_config(path, **changes)
  with pytest.raises(ValueError, match=f'field {field}='):
    hf.load(str(path))


def test_qwen2_with_its_per_layer_sliding_window_is_refused(hf_dirs, tmp_path):
  path = _copy(hf_dirs['qwen2'], tmp_path / 'm')
  _edit_config(path, use_sliding_window=True, sliding_window=8)
  with pytest.raises(ValueError, match='use_sliding_window=True'):
    hf.load(str(path))


def _shard(hf_dirs, tmp_path):
  """A copy of the llama checkpoint as a sharded directory."""
  model, variables = hf.load(str(hf_dirs['llama']))
  hf.save(model, variables, str(tmp_path / 'sharded'), max_shard_bytes=20_000)
  return tmp_path / 'sharded'


def test_a_missing_shard(hf_dirs, tmp_path):
  path = _shard(hf_dirs, tmp_path)
  (path / 'model-00002-of-00005.safetensors').unlink()
  with pytest.raises(FileNotFoundError, match='model-00002-of-00005.safetensors: a shard'):
    hf.load(str(path))


def test_a_truncated_shard(hf_dirs, tmp_path):
  path = _shard(hf_dirs, tmp_path)
  shard = path / 'model-00003-of-00005.safetensors'
  shard.write_bytes(shard.read_bytes()[:-100])
  with pytest.raises(ValueError, match='model-00003-of-00005.safetensors is not a readable'):
    hf.load(str(path))


def test_a_tensor_whose_shape_disagrees_with_config_json(hf_dirs, tmp_path):
  path = _copy(hf_dirs['llama'], tmp_path / 'm')
  _edit_config(path, intermediate_size=40)
  with pytest.raises(ValueError, match=r'model.safetensors: tensor model.layers.0.mlp.down_proj.weight '
                                       r'has shape \(32, 48\) but config.json implies \(32, 40\)'):
    hf.load(str(path))


def test_a_tensor_the_model_has_no_place_for(hf_dirs, tmp_path):
  path = _copy(hf_dirs['llama'], tmp_path / 'm')
  _edit_config(path, attention_bias=False, mlp_bias=True)  # The checkpoint has no mlp biases.
  with pytest.raises(ValueError, match=r'tensor model.layers.0.mlp.(gate|up|down)_proj.bias is missing'):
    hf.load(str(path))
  path = _copy(hf_dirs['llama_bias_tied'], tmp_path / 'b')
  _edit_config(path, attention_bias=False)  # ... but has q/k/v/o biases the config now lacks.
  with pytest.raises(ValueError, match='self_attn.(q|k|v|o)_proj.bias has no place in the model'):
    hf.load(str(path))


def test_save_refuses_a_model_no_family_expresses_and_writes_nothing(tmp_path):
  config = config_lib.base_config().model
  config.update(vocab_size=VOCAB, d_model=32, num_heads=4, num_kv_heads=4, head_dim=8, d_ff=64,
                num_layers=1, mlp='geglu')
  model = Transformer(ModelConfig.from_config(config))
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32)))
  with pytest.raises(ValueError, match=r"LlamaForCausalLM: model.mlp='geglu' \(the family needs "
                                       r"'swiglu'\).*GPT2LMHeadModel: model.positions='rope'"):
    hf.save(model, variables, str(tmp_path / 'out'))
  assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_non_empty_directory(hf_dirs, tmp_path):
  model, variables = hf.load(str(hf_dirs['gpt2']))
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'notes.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='is not empty'):
    hf.save(model, variables, str(tmp_path / 'out'))
  assert [p.name for p in (tmp_path / 'out').iterdir()] == ['notes.txt']
