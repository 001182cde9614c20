"""int8 quantization (lepton_jax/quant.py, model/int8.py): the arithmetic, the model under each
scheme against float references, the int8 KV cache, int8 checkpoints and the errors."""
import dataclasses
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lepton_jax import config_lib, generate, quant, sample, sharding, steps, train, tree
from lepton_jax.model import ModelConfig, Transformer, int8
from lepton_jax.model.config import QuantConfig
from tests.conftest import override, save_tiny_hf_llama, tiny_config

REPO = pathlib.Path(__file__).parent.parent
W8 = QuantConfig(weights='int8')
SCHEMES = {
    'w8_channel': W8,
    'w8_tensor': QuantConfig(weights='int8', granularity='tensor'),
    'w8_group': QuantConfig(weights='int8', granularity='group', group_size=16),
    'w8a8_token': QuantConfig(weights='int8', activations='int8'),
    'w8a8_tensor': QuantConfig(weights='int8', granularity='tensor', activations='int8',
                               activation_granularity='tensor'),
    'w8_embed_head': QuantConfig(weights='int8', embed=True, head=True),
}


def tiny_model(**fields) -> Transformer:
  config = config_lib.model_config()
  config.update(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, d_ff=128, max_seq_len=64, **fields)
  return Transformer(ModelConfig.from_config(config))


def init(model: Transformer) -> dict:
  return nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))


def tokens(shape, seed=1) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), shape, 0, 64)


@pytest.mark.parametrize('granularity', ['channel', 'tensor', 'group'])
def test_weight_round_trip_is_within_half_a_step(granularity):
  w_out_in = jax.random.normal(jax.random.key(0), (24, 4, 32)) * jnp.linspace(0.1, 3, 32)
  q = QuantConfig(weights='int8', granularity=granularity, group_size=8)
  w_int8, scale = int8.quantize_weight(w_out_in, 2, q)
  expected_scale_shape = {'channel': (24,), 'tensor': (), 'group': (24, 16)}[granularity]
  assert w_int8.dtype == jnp.int8 and scale.shape == expected_scale_shape
  assert int(jnp.max(jnp.abs(w_int8))) == 127  # Absmax: the largest value of each scale hits it.
  error = np.abs(np.asarray(int8.dequantize_weight(w_int8, scale, 2, q, jnp.float32) - w_out_in))
  if granularity == 'channel':
    step = scale[:, None, None]
  else:
    step = jnp.repeat(scale, 8, axis=-1).reshape(24, 4, 32) if granularity == 'group' else scale
  assert np.all(error <= np.asarray(step) / 2 + 1e-7)


def test_kv_round_trip_is_within_half_a_step_per_token_and_head():
  x_BTKH = jax.random.normal(jax.random.key(0), (2, 5, 3, 16)) * 4
  x_int8, scale_BTK = int8.quantize_kv(x_BTKH)
  assert scale_BTK.shape == (2, 5, 3)
  error = np.abs(np.asarray(x_int8 * scale_BTK[..., None] - x_BTKH))
  assert np.all(error <= np.asarray(scale_BTK[..., None]) / 2 + 1e-6)


def fake_quantized(variables: dict, q: QuantConfig, scanned: bool) -> dict:
  """Float variables holding what int8 weights stand for: every kernel (and the embedding)
  that `q` quantizes, quantized and dequantized in its float layout."""
  def fake(name, w):
    if not name.endswith(('kernel', 'embedding')) or (name.startswith('head/') and not q.head
                                                      or name.startswith('embed/') and not q.embed):
      return w
    num_in = 2 if name.endswith('attn/out/kernel') else 1

    def round_trip(w):
      if name.endswith('embedding'):  # [V, D]: already [*out, *in].
        return int8.dequantize_weight(*int8.quantize_weight(w, 1, q), 1, q, jnp.float32)
      w_int8, scale = int8.quantize_weight(int8.rotate_axes(w, num_in), num_in, q)
      return int8.rotate_axes(int8.dequantize_weight(w_int8, scale, num_in, q, jnp.float32),
                              w.ndim - num_in)

    return jax.vmap(round_trip)(w) if scanned and name.startswith('layers/') else round_trip(w)

  return {'params': tree.map_with_names(fake, variables['params'])}


@pytest.mark.parametrize('scheme,scan', [('w8_channel', False), ('w8_tensor', False),
                                         ('w8_group', False), ('w8_embed_head', False),
                                         ('w8_group', True)])
def test_weight_only_model_equals_the_float_model_of_its_dequantized_weights(scheme, scan):
  model = tiny_model(scan_layers=scan)
  variables = init(model)
  model_q, variables_q = quant.quantize(model, variables, SCHEMES[scheme])
  assert not any(name.endswith('query/kernel') for name in tree.names(variables_q['params']))
  tokens_BT = tokens((2, 16))
  expected = model.apply(fake_quantized(variables, SCHEMES[scheme], scan), tokens_BT)
  np.testing.assert_allclose(model_q.apply(variables_q, tokens_BT), expected, rtol=1e-5,
                             atol=1e-5)


def test_w8a8_runs_an_int8_dot_and_per_token_beats_per_tensor():
  model = tiny_model()
  variables = init(model)
  reference = model.apply(variables, tokens((4, 16)))
  errors = {}
  for scheme in ('w8_channel', 'w8a8_token', 'w8a8_tensor'):
    model_q, variables_q = quant.quantize(model, variables, SCHEMES[scheme])
    text = jax.jit(model_q.apply).lower(variables_q, tokens((4, 16))).as_text()
    int8_dot = re.search(r'dot_general[^\n]*xi8>[^\n]*-> tensor<[^>]*xi32>', text)
    assert bool(int8_dot) == scheme.startswith('w8a8'), scheme
    out = model_q.apply(variables_q, tokens((4, 16)))
    errors[scheme] = float(jnp.abs(out - reference).max() / jnp.abs(reference).max())
  assert errors['w8_channel'] < 0.02 and errors['w8a8_token'] < 0.03
  assert errors['w8a8_token'] < errors['w8a8_tensor']


def test_runtime_fields_change_on_int8_weights_and_weight_fields_are_refused():
  model = tiny_model()
  model_q, variables_q = quant.quantize(model, init(model), W8)
  model_a8, same = quant.quantize(model_q, variables_q, dataclasses.replace(W8, activations='int8'))
  assert same is variables_q and model_a8.cfg.quant.activations == 'int8'
  with pytest.raises(ValueError, match="int8 already.*quantize the float model"):
    quant.quantize(model_q, variables_q, dataclasses.replace(W8, granularity='tensor'))


def test_quantizing_on_a_mesh_splits_the_int8_weights_by_the_logical_rules():
  config = config_lib.base_config()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config.mesh)
  model = tiny_model()
  variables = init(model)
  _, variables_q = quant.quantize(model, variables, W8, mesh, config.mesh.rules)
  query = variables_q['quant']['layers_0']['attn']['query']
  assert query['kernel'].sharding.spec == jax.sharding.PartitionSpec('tensor', None, 'fsdp')
  assert query['scale'].sharding.spec == jax.sharding.PartitionSpec('tensor', None)
  _, alone = quant.quantize(model, variables, W8)
  assert np.array_equal(query['kernel'], alone['quant']['layers_0']['attn']['query']['kernel'])


@pytest.mark.parametrize('fields', [dict(), dict(sliding_window=6), dict(scan_layers=True)])
def test_an_int8_kv_cache_decodes_close_to_the_float_cache(fields):
  model = tiny_model(**fields)
  variables = init(model)
  model_q, _ = quant.quantize(model, variables, QuantConfig(kv_cache='int8'))
  prompts = [[3, 9, 27, 17, 51, 25], [5, 6]]
  state = generate.prefill(model_q, variables, *generate.pad_prompts(prompts, 2, 16), 32,
                           generate.sampling(2), np.array([8, 8]), generate.stop_array([]))
  cache = nn.unbox(state.cache)
  layer = cache['layers']['attn'] if fields.get('scan_layers') else cache['layers_0']['attn']
  assert layer['cached_key'].dtype == jnp.int8 and layer['cached_key_scale'].dtype == jnp.float32
  # Logits of every decode step, teacher-forced, against the full forward pass.
  full_BTV = model.apply(variables, tokens((1, 24)))
  state = generate.prefill(model_q, variables, tokens((1, 24))[:, :8], np.array([8]), 32,
                           generate.sampling(1), np.array([30]), generate.stop_array([]))
  errors = []
  for t in range(8, 23):
    state = state.replace(tokens_B=tokens((1, 24))[:, t])
    logits_B1V, mutated = model_q.apply(
        {**variables, 'cache': state.cache}, state.tokens_B[:, None], state.positions_B[:, None],
        cache=generate.attention.Decode(), mutable=['cache'])
    state = state.replace(cache=mutated['cache'], positions_B=state.positions_B + 1)
    errors.append(float(jnp.abs(logits_B1V[0, 0] - full_BTV[0, t]).max()))
  assert max(errors) < 0.02 * float(jnp.abs(full_BTV).max())


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny byte-level model trained to a low loss, and text it did not train on."""
  tmp_path = tmp_path_factory.mktemp('trained')
  config = tiny_config(tmp_path, total_steps=120, eval_every_steps=60,
                       checkpoint_every_steps=60, log_every_steps=60)
  config.model.update(d_model=64, num_heads=4, num_kv_heads=2, d_ff=128)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  return config, workdir


def with_fields(config, **dotted):
  """A copy of `config` with dotted keys set (the fixture's config stays as trained)."""
  return override(ml_collections.ConfigDict(config.to_dict()), **dotted)


def held_out_loss(model, variables, text: str) -> float:
  ids = np.frombuffer(text.encode(), np.uint8).astype(np.int32)[:8 * 33].reshape(8, 33)
  batch = {'inputs': ids[:, :-1], 'targets': ids[:, 1:]}
  sums = jax.jit(steps.eval_step, static_argnames='model')(variables, batch, model=model)
  return float(sums['loss_sum'] / sums['tokens'])


HELD_OUT = ''.join(f'line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n'
                   for i in range(900, 940))


def test_quantized_trained_model_loses_little(trained):
  config, workdir = trained
  model, variables, _ = sample.load(config, workdir)
  f32 = held_out_loss(model, variables, HELD_OUT)
  assert f32 < 1.0  # Trained: the bound below means something.
  changes = {}
  for scheme in ('w8_channel', 'w8a8_token'):
    quantized = sample.load(with_fields(config, **{
        f'quant.{k}': v for k, v in dataclasses.asdict(SCHEMES[scheme]).items()}), workdir)
    changes[scheme] = held_out_loss(*quantized[:2], HELD_OUT) / f32 - 1
  # Measured: +0.06% (weight-only) and +0.04% (W8A8) of a loss near 0.30.
  assert abs(changes['w8_channel']) < 0.01 and abs(changes['w8a8_token']) < 0.02, changes


def test_greedy_tokens_with_int8_weights_and_cache_mostly_agree(trained):
  config, workdir = trained
  model, variables, tokenizer = sample.load(config, workdir)
  prompts = [list(f'line {i}: the'.encode()) for i in (901, 913, 927, 938)]
  expected = generate.generate(model, variables, prompts, 16)
  model_q, variables_q, _ = sample.load(
      with_fields(config, **{'quant.weights': 'int8', 'quant.kv_cache': 'int8'}), workdir)
  got = generate.generate(model_q, variables_q, prompts, 16)
  agree = np.mean([a == b for row_a, row_b in zip(expected, got) for a, b in zip(row_a, row_b)])
  assert agree >= 0.9, agree  # Measured: 1.0 on this model.


def quantize_script(*args):
  return subprocess.run([sys.executable, 'scripts/quantize.py', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_int8_checkpoint_round_trip_through_the_script(trained, tmp_path):
  config, workdir = trained
  config_file = tmp_path / 'run_config.py'
  config_file.write_text('import ml_collections\n\n\ndef get_config():\n'
                         f'  return ml_collections.ConfigDict({config.to_dict()!r})\n')
  out = tmp_path / 'int8'
  args = (f'--config={config_file}', f'--workdir={workdir}', f'--out={out}')
  everything = {'quant.weights': 'int8', 'quant.embed': True, 'quant.head': True}
  result = quantize_script(*args, *(f'--config.{k}={v}' for k, v in everything.items()))
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'of float32' in result.stdout
  model_q, variables_q, _ = sample.load(with_fields(config, **everything), workdir)
  # OUT brings its own weight fields: the run's config, without quant settings, loads it.
  loaded_model, loaded, _ = sample.load(config, str(out))
  assert loaded_model.cfg.quant == model_q.cfg.quant
  assert jax.tree.all(jax.tree.map(np.array_equal, loaded, variables_q))
  assert quant.variable_bytes(loaded) < 0.28 * quant.float_bytes(loaded, 'float32')
  with pytest.raises(ValueError, match='contradicts .* an int8 checkpoint with granularity'):
    sample.load(with_fields(config, **{'quant.granularity': 'tensor'}), str(out))
  again = quantize_script(*args, '--config.quant.weights=int8')
  assert again.returncode != 0 and 'is not empty' in again.stderr
  unset = quantize_script(*args[:2], f'--out={tmp_path / "other"}')
  assert unset.returncode != 0 and 'leaves nothing to quantize' in unset.stderr


@pytest.mark.parametrize('fields,message', [
    (dict(activations='int8'), r"quant.activations='int8' needs config.quant.weights='int8'"),
    (dict(weights='int8', granularity='group', activations='int8'), 'is weight-only'),
    (dict(weights='int8', group_size=0), 'group_size=0: must be positive'),
    (dict(weights='int8', kernel='fast'), r"config.quant.kernel='fast': expected one of"),
])
def test_bad_quant_config_is_a_one_line_error(fields, message):
  config = config_lib.base_config()
  config.quant.update(fields)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_tied_head_and_embedding_quantize_together_or_not_at_all():
  model = tiny_model(tie_embeddings=True)
  with pytest.raises(ValueError, match='tied embeddings the head is the embedding table'):
    quant.quantize(model, init(model), dataclasses.replace(W8, head=True))
  model_q, variables_q = quant.quantize(model, init(model),
                                        dataclasses.replace(W8, head=True, embed=True))
  assert variables_q['quant']['embed']['embedding'].dtype == jnp.int8
  assert 'embed' not in variables_q['params']


def test_a_group_size_that_does_not_divide_a_dim_names_the_layer():
  model = tiny_model()
  with pytest.raises(ValueError, match=r'group_size=48 does not divide the inputs of '
                                       r'layers_0/attn/query \(embed=64\)'):
    quant.quantize(model, init(model), QuantConfig(weights='int8', granularity='group',
                                                   group_size=48))


def test_a_hugging_face_model_quantizes_to_an_int8_checkpoint(tmp_path):
  pytest.importorskip('transformers')
  from lepton_jax import hf  # pylint: disable=g-import-not-at-top
  save_tiny_hf_llama(tmp_path / 'hf')
  out = tmp_path / 'int8'
  args = (f'--hf_dir={tmp_path / "hf"}', f'--out={out}', '--config.quant.weights=int8')
  without_config = quantize_script(*args)
  assert without_config.returncode != 0
  assert 'give --config=FILE before them (configs/base.py' in without_config.stderr
  result = quantize_script('--config=configs/base.py', *args, '--config.quant.activations=int8')
  assert result.returncode == 0, result.stderr[-2000:]
  # Its weight fields come from OUT; activations are how a load runs, the base config's here.
  small = override(config_lib.base_config(), seq_len=32, **{'sample.num_tokens': 0})
  model, variables, tokenizer = sample.load(small, str(out))
  assert model.cfg.quant.weights == 'int8' and model.cfg.quant.activations == 'none'
  _, expected = quant.quantize(*hf.load(str(tmp_path / 'hf')), W8)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  assert tokenizer.encode('def main():') == hf.load_tokenizer(str(tmp_path / 'hf')).encode(
      'def main():')
