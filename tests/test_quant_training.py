"""Training with config.quant: quantization-aware training (quant.qat: float weights through the
int8 scheme, straight-through gradients) and QLoRA (LoRA adapters over a frozen int8 base)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lepton_jax import checkpoint, config_lib, objectives, quant, sample, train, tree
from lepton_jax.model import ModelConfig, Transformer, int8
from lepton_jax.model.config import QuantConfig
from tests.conftest import override, read_metrics, tiny_config, train_preempted_and_resumed

SCHEMES = {
    'w8_channel': QuantConfig(weights='int8'),
    'w8_group': QuantConfig(weights='int8', granularity='group', group_size=16),
    'w8a8_token': QuantConfig(weights='int8', activations='int8'),
    'w8a8_tensor': QuantConfig(weights='int8', granularity='tensor', activations='int8',
                               activation_granularity='tensor'),
    'w8_embed_head': QuantConfig(weights='int8', embed=True, head=True),
}


def tiny_model(quant_config=QuantConfig(), **fields) -> Transformer:
  config = config_lib.model_config()
  config.update(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, d_ff=128, max_seq_len=64, **fields)
  cfg = ModelConfig.from_config(config)
  return Transformer(dataclasses.replace(cfg, quant=quant_config))


def float_params(model: Transformer) -> dict:
  return nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))


TOKENS_BT = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)


@pytest.mark.parametrize('scheme', sorted(SCHEMES))
@pytest.mark.parametrize('scan_layers', [False, True])
def test_a_qat_model_computes_what_its_int8_model_computes(scheme, scan_layers):
  qat = dataclasses.replace(SCHEMES[scheme], qat=True)
  qat_model = tiny_model(qat, scan_layers=scan_layers)
  variables = float_params(tiny_model(scan_layers=scan_layers))
  assert jax.tree.structure(variables) == jax.tree.structure(float_params(qat_model))
  int8_model, int8_variables = quant.quantize(tiny_model(scan_layers=scan_layers), variables,
                                              qat)
  assert not int8_model.cfg.quant.qat
  qat_BTV = qat_model.apply(variables, TOKENS_BT)
  int8_BTV = int8_model.apply(int8_variables, TOKENS_BT)
  float_BTV = tiny_model(scan_layers=scan_layers).apply(variables, TOKENS_BT)
  # Weights alone agree to float rounding (measured <= 7e-7 of the largest logit). W8A8 rounds
  # activations too: where the two models' float sums differ in the last bit, an activation can
  # round one int8 step apart and the step propagates (each layer alone agrees to 3e-7; all of
  # them, per-tensor weights: 0.3% of the largest logit, a mean gap 0.14x the float model's).
  w8a8 = qat.activations == 'int8'
  largest = float(jnp.abs(int8_BTV).max())
  np.testing.assert_allclose(qat_BTV, int8_BTV, atol=(5e-3 if w8a8 else 2e-5) * largest)
  gap = lambda a_BTV: float(jnp.mean(jnp.abs(a_BTV - int8_BTV)))
  assert gap(qat_BTV) < (0.25 if w8a8 else 1e-3) * gap(float_BTV)


def loss(model, variables) -> jax.Array:
  logits_BTV = model.apply(variables, TOKENS_BT[:, :-1])
  loss_BT, _ = objectives.token_losses(logits_BTV, TOKENS_BT[:, 1:], 0.0)
  return jnp.mean(loss_BT)


def test_qat_gradients_pass_straight_through_the_rounding():
  """d loss / d W under qat is the float model's gradient at the fake-quantized weights."""
  qat = dataclasses.replace(SCHEMES['w8_channel'], qat=True)
  qat_model, float_model = tiny_model(qat), tiny_model()
  variables = float_params(float_model)
  qat_grads = jax.grad(lambda v: loss(qat_model, v))(variables)

  def fake_quantized(name, leaf):
    path = name.removeprefix('params/').removesuffix('/kernel')
    if name.endswith('/kernel') and qat.quantizes(path):
      num_in = 2 if path.endswith('attn/out') else 1  # out: [heads, head_dim, embed].
      return int8.fake_quantize_kernel(leaf, num_in, qat)
    return leaf

  rounded = tree.map_with_names(fake_quantized, variables)
  float_grads = jax.grad(lambda v: loss(float_model, v))(rounded)
  for name, a, b in zip(tree.names(qat_grads), jax.tree.leaves(qat_grads),
                        jax.tree.leaves(float_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=name)
  assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(qat_grads))


def test_a_qat_run_loads_as_the_int8_model_it_trained_through(tmp_path):
  scheme = {'quant.weights': 'int8', 'quant.activations': 'int8', 'model.vocab_size': 257}
  config = tiny_config(tmp_path, total_steps=8, eval_every_steps=8, checkpoint_every_steps=8,
                       **scheme, **{'quant.qat': True})
  workdir = str(tmp_path / 'qat')
  train.train_and_evaluate(config, workdir)
  records = read_metrics(tmp_path / 'qat')
  assert records[-1]['train/loss'] < records[0]['train/loss']
  int8_model, int8_variables, _ = sample.load(config, workdir)
  assert not int8_model.cfg.quant.qat
  assert tree.names(int8_variables['quant']) and all(
      leaf.dtype in (jnp.int8, jnp.float32) for leaf in jax.tree.leaves(int8_variables['quant']))
  # The trained float weights, under the QAT model the run trained, compute the same.
  float_config = override(ml_collections.ConfigDict(config.to_dict()),
                          **{'quant.weights': 'none', 'quant.activations': 'none',
                             'quant.qat': False})
  float_model, float_variables, _ = sample.load(float_config, workdir)
  qat_model = Transformer(dataclasses.replace(float_model.cfg, quant=dataclasses.replace(
      int8_model.cfg.quant, qat=True)))
  tokens_BT = jnp.asarray(np.frombuffer(b'line 77: the quick brown fox', np.uint8)[None],
                          jnp.int32)
  int8_BTV = int8_model.apply(int8_variables, tokens_BT)
  np.testing.assert_allclose(qat_model.apply(float_variables, tokens_BT), int8_BTV,
                             atol=2e-5 * float(jnp.abs(int8_BTV).max()))


QLORA = {'lora.targets': ('all-linear',), 'lora.rank': 4, 'quant.weights': 'int8',
         'model.vocab_size': 257}


@pytest.fixture(scope='module')
def base_run(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('base')
  config = tiny_config(tmp_path, total_steps=10, **{'model.vocab_size': 257})
  train.train_and_evaluate(config, str(tmp_path / 'base'))
  return tmp_path / 'base'


def qlora_config(tmp_path, base_run, **overrides):
  return tiny_config(tmp_path, init_from=f'workdir:{base_run}', **{
      'total_steps': 6, 'optimizer.learning_rate': 1e-2, **QLORA, **overrides})


def test_qlora_trains_adapters_over_the_int8_base_it_loads(tmp_path, base_run):
  config = qlora_config(tmp_path, base_run)
  workdir = tmp_path / 'qlora'
  train.train_and_evaluate(config, str(workdir))
  records = read_metrics(workdir)
  assert records[-1]['train/loss'] < records[0]['train/loss']
  # The checkpoint holds the adapters; the int8 base is referenced, never copied.
  ckpt = checkpoint.Checkpointer(str(workdir), read_only=True)
  meta = ckpt.frozen_reference(6)
  ckpt.close()
  assert meta and meta['source'] == f'workdir:{base_run}'
  model, variables, _ = sample.load(config, str(workdir))
  float_kernels = [name for name in tree.names(variables['params']) if name.endswith('/kernel')]
  assert float_kernels == ['head/kernel']  # quant.head is off: every other Dense is int8.
  # The base is the base run's weights quantized as the run says, the same bits at every load.
  base_config = tiny_config(tmp_path, **{'model.vocab_size': 257, 'quant.weights': 'int8'})
  base_model, base_variables, _ = sample.load(base_config, str(base_run))
  assert tree.names(variables['quant']) == tree.names(base_variables['quant'])
  for a, b in zip(jax.tree.leaves(variables['quant']), jax.tree.leaves(base_variables['quant'])):
    np.testing.assert_array_equal(a, b)
  tokens_BT = jnp.asarray(np.frombuffer(b'line 77: the quick', np.uint8)[None], jnp.int32)
  assert not np.allclose(base_model.apply(base_variables, tokens_BT),
                         model.apply(variables, tokens_BT), atol=1e-4)  # The adapters trained.


def test_a_qlora_run_resumes_exactly(tmp_path, base_run, monkeypatch):
  config = qlora_config(tmp_path, base_run)
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  train_preempted_and_resumed(config, tmp_path / 'resumed', monkeypatch, 3)
  assert ([r['train/loss'] for r in read_metrics(tmp_path / 'straight')] ==
          [r['train/loss'] for r in read_metrics(tmp_path / 'resumed')])


@pytest.mark.parametrize('weights', ['none', 'int8'])
def test_a_fresh_dora_adapter_over_a_loaded_base_changes_nothing(tmp_path, base_run, weights):
  """DoRA's magnitudes start as the column norms of the loaded (dequantized) kernels."""
  config = qlora_config(tmp_path, base_run, **{
      'total_steps': 1, 'quant.weights': weights, 'lora.dora': True, 'optimizer.learning_rate': 0.0,
      'optimizer.warmup_steps': 0})
  train.train_and_evaluate(config, str(tmp_path / 'dora'))
  model, variables, _ = sample.load(config, str(tmp_path / 'dora'))
  base_config = tiny_config(tmp_path, **{'model.vocab_size': 257, 'quant.weights': weights})
  base_model, base_variables, _ = sample.load(base_config, str(base_run))
  tokens_BT = jnp.asarray(np.frombuffer(b'line 77: the quick', np.uint8)[None], jnp.int32)
  np.testing.assert_allclose(model.apply(variables, tokens_BT),
                             base_model.apply(base_variables, tokens_BT), atol=1e-5)


def test_a_qat_run_from_a_trained_run_starts_from_its_float_weights(tmp_path, base_run):
  """qat trains float weights: init_from loads them as they are, not quantized (which left no
  float kernel to load, so every Dense restarted from its random init)."""
  config = tiny_config(tmp_path, init_from=f'workdir:{base_run}', total_steps=1, **{
      'model.vocab_size': 257, 'quant.weights': 'int8', 'quant.activations': 'int8',
      'quant.qat': True, 'optimizer.learning_rate': 0.0, 'optimizer.warmup_steps': 0})
  train.train_and_evaluate(config, str(tmp_path / 'qat'))
  float_only = {'quant.weights': 'none', 'quant.activations': 'none', 'quant.qat': False}
  _, variables, _ = sample.load(override(ml_collections.ConfigDict(config.to_dict()),
                                         **float_only), str(tmp_path / 'qat'))
  base_config = tiny_config(tmp_path, **{'model.vocab_size': 257})
  _, base_variables, _ = sample.load(base_config, str(base_run))
  for name, a, b in zip(tree.names(variables['params']), jax.tree.leaves(variables['params']),
                        jax.tree.leaves(base_variables['params'])):
    np.testing.assert_array_equal(a, b, err_msg=name)  # A step at learning rate 0.


@pytest.mark.parametrize('overrides, message', [
    ({'lora.targets': ()}, r"quant.weights='int8' trains LoRA adapters over an int8 base"),
    ({'quant.activations': 'int8'}, r'int8 activations have no gradient'),
    ({'quant.kernel': 'pallas'}, r'Pallas int8 kernels have no gradient rule'),
])
def test_int8_training_that_cannot_work_is_a_one_line_error(tmp_path, base_run, overrides,
                                                            message):
  config = qlora_config(tmp_path, base_run, **overrides)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_qat_without_int8_weights_is_a_one_line_error():
  config = config_lib.base_config()
  config.quant.qat = True
  with pytest.raises(ValueError, match=r"quant.qat=True trains through int8 weights"):
    config_lib.validate(config)
