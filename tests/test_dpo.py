"""The dpo objective: each loss against numpy, TRL's metrics, the reference (a frozen copy, or with
LoRA the base with the adapters off and no second copy), and dpo runs that learn and resume."""
import importlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lepton_jax import config_lib, dpo_reference, lora, objectives, sharding, train, train_state
from lepton_jax.data import formats, packing, pipeline, tokenizers
from lepton_jax.model import ModelConfig, Transformer
from tests.conftest import read_metrics, tiny_config


def numpy_dpo(pi_c, pi_r, ref_c, ref_r, loss, beta, eps):
  """The DPO, rDPO and IPO losses as the papers (and TRL) write them, in float64."""
  log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
  h = (pi_c - ref_c) - (pi_r - ref_r)
  return {'sigmoid': -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h),
          'robust': (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) /
                    (1 - 2 * eps),
          'ipo': (h - 1 / (2 * beta)) ** 2}[loss]


@pytest.mark.parametrize('loss,eps', [('sigmoid', 0.0), ('sigmoid', 0.1), ('robust', 0.2),
                                      ('ipo', 0.0)])
def test_each_loss_matches_numpy(loss, eps):
  pi_c, pi_r, ref_c, ref_r = np.random.default_rng(0).normal(-20, 3, (4, 16))
  got, chosen_reward, rejected_reward = objectives.dpo_losses(
      *map(jnp.asarray, (pi_c, pi_r, ref_c, ref_r)), loss=loss, beta=0.3, label_smoothing=eps)
  # float32 log-probs near -20 differ by ~1e-6 before the loss sees them.
  np.testing.assert_allclose(got, numpy_dpo(pi_c, pi_r, ref_c, ref_r, loss, 0.3, eps),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(chosen_reward, 0.3 * (pi_c - ref_c), atol=1e-5)
  np.testing.assert_allclose(rejected_reward, 0.3 * (pi_r - ref_r), atol=1e-5)


def preference_batch(tokenizer, pairs, seq_len=24) -> dict:
  """A dpo batch of (prompt, chosen, rejected) strings, as the data pipeline builds it."""
  records = [formats.Record(f'x.jsonl:{i}', '', dict(prompt=p, chosen=c, rejected=r))
             for i, (p, c, r) in enumerate(pairs)]
  batch = {}
  examples = [formats.encode_preference(record, tokenizer) for record in records]
  for index, side in enumerate(('chosen', 'rejected')):
    rows = packing.pack([e[index] for e in examples], seq_len, False, 'right', tokenizer.eos_id)
    batch.update({f'{side}_inputs': rows.inputs, f'{side}_targets': rows.targets,
                  f'{side}_positions': rows.positions,
                  f'{side}_loss_mask': rows.loss_mask.astype(np.float32)})
  batch['mask'] = np.ones(len(pairs), np.float32)
  return {k: jnp.asarray(v) for k, v in batch.items()}


PAIRS = [('2+2=', '4', '5'), ('say hi: ', 'hi', 'bye!'), ('x', 'yz', 'zy')]


def numpy_sequence_logps(logits, targets, mask):
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1)[..., 0]
  return (picked * np.asarray(mask)).sum(-1)


def test_sequence_logps_sum_the_completion_and_its_eos_and_the_start_has_zero_margin():
  bytes_tokenizer = tokenizers.ByteTokenizer()
  batch = preference_batch(bytes_tokenizer, PAIRS)
  # The loss tokens are the completion's bytes and the eos TRL appends, nothing of the prompt.
  assert batch['chosen_loss_mask'].sum(-1).tolist() == [2, 3, 3]
  assert batch['rejected_loss_mask'].sum(-1).tolist() == [2, 5, 3]
  cfg = tiny_config(**{'model.vocab_size': 257, 'model.max_seq_len': 24}).model
  model = Transformer(ModelConfig.from_config(cfg))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 24), jnp.int32))
  objective = objectives.dpo(model)
  policy = lambda tokens, positions=None, segments=None: model.apply(variables, tokens, positions)
  frozen = objective.frozen_model({**variables, objectives.REFERENCE: variables['params']})
  loss_sum, sums = objective.loss(policy, frozen, batch)
  logits = model.apply(variables, batch['chosen_inputs'], batch['chosen_positions'])
  np.testing.assert_allclose(sums['logps/chosen'], numpy_sequence_logps(
      logits, batch['chosen_targets'], batch['chosen_loss_mask']).sum(), rtol=1e-5)
  # The policy is its reference: every reward and margin is zero, the loss log 2 per pair.
  np.testing.assert_allclose(loss_sum / sums['pairs'], np.log(2), rtol=1e-6)
  for key in ('rewards/chosen', 'rewards/rejected', 'rewards/margins', 'rewards/accuracies'):
    assert float(sums[key]) == 0.0, key
  # Precomputed reference log-probs stand in for the reference model.
  shifted = dict(batch, reference_chosen_logps=jnp.zeros(3), reference_rejected_logps=jnp.zeros(3))
  _, precomputed = objective.loss(policy, None, shifted)
  np.testing.assert_allclose(precomputed['rewards/chosen'], 0.1 * sums['logps/chosen'], rtol=1e-5)


def layout_bytes(config):
  """(trainable bytes, frozen bytes, the frozen collections) of a run's train state layout."""
  config_lib.validate(config)
  cfg = ModelConfig.from_config(config_lib.resolve_vocab(config.model, tokenizers.ByteTokenizer()),
                                config.lora, config.quant)
  model = Transformer(cfg)
  mesh = sharding.make_mesh(config.mesh)
  objective = objectives.from_config(config, model)
  layout = train_state.make_layout(model, optax.sgd(0.1), mesh, config.mesh.rules,
                                   config.seq_len, lora.trainable_patterns(config),
                                   objective.params_copy)
  size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  params_bytes = size(layout.variables['params'])
  return size(layout.state.trainable), size(layout.frozen), params_bytes, set(layout.frozen)


def dpo_config(tmp_path, **overrides):
  path = tmp_path / 'pairs.jsonl'
  with open(path, 'w', encoding='utf-8') as f:
    for i in range(160):  # Prefer a polite answer, whatever the question.
      f.write(json.dumps({'prompt': f'q{i}? ', 'chosen': 'yes, gladly', 'rejected': 'no'}) + '\n')
  return tiny_config(tmp_path, **{
      'objective': 'dpo', 'data.source': 'jsonl', 'data.format': 'preference',
      'data.path': str(path), 'seq_len': 24, 'model.max_seq_len': 24, 'model.vocab_size': 257,
      **overrides})


def test_lora_dpo_keeps_one_copy_of_the_base_and_full_dpo_a_frozen_reference(tmp_path):
  trainable, frozen, params, collections = layout_bytes(dpo_config(tmp_path))
  assert trainable == params and frozen == params and collections == {objectives.REFERENCE}
  trainable, frozen, params, collections = layout_bytes(
      dpo_config(tmp_path, **{'lora.targets': ('q', 'v')}))
  # The adapters train; the base is frozen once, and the reference reads that same base.
  assert collections == {'params'} and trainable + frozen == params and trainable < params / 10


def test_the_lora_reference_is_the_base_with_the_adapters_off():
  cfg = tiny_config(**{'model.vocab_size': 257, 'lora.targets': ('q', 'v', 'down')})
  model = Transformer(ModelConfig.from_config(cfg.model, cfg.lora))
  variables = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32)))
  variables = {'params': jax.tree_util.tree_map_with_path(  # Non-zero adapters change logits.
      lambda path, x: x + 0.5 if 'lora_b' in jax.tree_util.keystr(path) else x,
      variables['params'])}
  plain = Transformer(ModelConfig.from_config(cfg.model))
  tokens = jnp.arange(16)[None] % 200
  base_logits = plain.apply({'params': lora.base_of(variables['params'])}, tokens)
  frozen = objectives.from_config(config_lib.override(cfg, {'objective': 'dpo'}), model)
  np.testing.assert_array_equal(frozen.frozen_model(variables)(tokens), base_logits)
  assert not np.allclose(model.apply(variables, tokens), base_logits)


@pytest.mark.parametrize('lora_targets', [(), ('q', 'v', 'up', 'down')])
def test_a_dpo_run_widens_the_margin_and_resumes_exactly(tmp_path, monkeypatch, lora_targets):
  config = dpo_config(tmp_path, total_steps=12, checkpoint_every_steps=100, eval_every_steps=6,
                      grad_accum_steps=2, batch_size=16,
                      **{'lora.targets': lora_targets, 'optimizer.learning_rate': 1e-2})
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  interrupted = str(tmp_path / 'interrupted')
  monkeypatch.setattr(train.PreemptionWatch, 'reached', lambda self, step: step == 7)
  train.train_and_evaluate(config, interrupted)
  assert os.listdir(os.path.join(interrupted, 'checkpoints')) == ['7']
  monkeypatch.undo()
  train.train_and_evaluate(config, interrupted)
  straight, resumed = read_metrics(tmp_path / 'straight'), read_metrics(interrupted)
  assert [r['step'] for r in resumed] == list(range(1, 13))
  for a, b in zip(straight, resumed):
    assert a['train/loss'] == b['train/loss'], a['step']
    assert a.get('eval/rewards/margins') == b.get('eval/rewards/margins')
  first, last = straight[0], straight[-1]
  assert first['train/rewards/margins'] == 0.0 and first['train/loss'] == pytest.approx(np.log(2))
  assert last['train/rewards/margins'] > 0.5 and last['eval/rewards/accuracies'] == 1.0
  assert last['eval/rewards/margins'] > straight[5]['eval/rewards/margins'] > 0
  assert {'eval/logps/chosen', 'eval/logps/rejected', 'eval/rewards/chosen',
          'eval/rewards/rejected'} <= last.keys()


@pytest.mark.parametrize('loss,lora_targets', [('sigmoid', ()), ('ipo', ('q', 'v'))])
def test_precomputed_reference_log_probs_give_the_on_the_fly_step(tmp_path, loss, lora_targets):
  config = dpo_config(tmp_path, **{'dpo.loss': loss, 'lora.targets': lora_targets})
  cfg = ModelConfig.from_config(config_lib.resolve_vocab(config.model, tokenizers.ByteTokenizer()),
                                config.lora)
  model = Transformer(cfg)
  variables = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 24), jnp.int32)))
  # The policy moved away from where it started (its reference): the adapters, or every param.
  trained = {'params': jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.3 if 'lora_b' in jax.tree_util.keystr(path) or not lora_targets
      else x, variables['params'])}
  mesh = sharding.make_mesh(config.mesh)
  with sharding.use_mesh(mesh, config.mesh.rules):
    log_probs = dpo_reference.precompute(model, variables, loss, 8, mesh, config.mesh.rules)
  batch = next(pipeline.make_train_iterator(config, tokenizers.ByteTokenizer(), 0, 1, log_probs))
  assert batch['reference_chosen_logps'].shape == batch['reference_rejected_logps'].shape == (8,)
  on_the_fly = objectives.from_config(config, model)
  config.dpo.precompute_ref_log_probs = True
  precomputed = objectives.from_config(config, model)
  frozen = trained if lora_targets else {**trained, objectives.REFERENCE: variables['params']}
  policy = lambda tokens, positions=None, segments=None: model.apply(trained, tokens, positions)
  without_reference = {k: jnp.asarray(v) for k, v in batch.items()
                       if not k.startswith('reference_')}
  reference_loss, reference_sums = on_the_fly.loss(policy, on_the_fly.frozen_model(frozen),
                                                   without_reference)
  loss_sum, sums = precomputed.loss(policy, None, {k: jnp.asarray(v) for k, v in batch.items()})
  # Log-probs near -60 in float32, from a jitted pass against op-by-op ones: a few ulps apart.
  np.testing.assert_allclose(loss_sum, reference_loss, rtol=1e-6)
  for key in objectives.DPO_METRICS:
    np.testing.assert_allclose(sums[key], reference_sums[key], rtol=1e-6, atol=1e-5, err_msg=key)
  assert float(reference_sums['rewards/margins']) != 0.0  # The policy differs from its reference.
  with pytest.raises(ValueError, match='precompute_ref_log_probs=True, but this batch carries no'):
    precomputed.loss(policy, None, without_reference)


def test_a_precomputed_reference_keeps_no_copy_and_the_run_resumes_exactly(tmp_path, monkeypatch):
  config = dpo_config(tmp_path, total_steps=6, checkpoint_every_steps=100, eval_every_steps=3,
                      **{'optimizer.learning_rate': 1e-2, 'dpo.precompute_ref_log_probs': True})
  trainable, frozen, params, collections = layout_bytes(config)
  assert trainable == params and frozen == 0 and not collections  # No reference copy.
  interrupted = str(tmp_path / 'interrupted')
  monkeypatch.setattr(train.PreemptionWatch, 'reached', lambda self, step: step == 4)
  train.train_and_evaluate(config, interrupted)
  assert not os.path.exists(os.path.join(interrupted, 'frozen'))
  monkeypatch.undo()
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  train.train_and_evaluate(config, interrupted)  # Recomputes the reference from the start.
  straight, resumed = read_metrics(tmp_path / 'straight'), read_metrics(interrupted)
  assert [r['step'] for r in resumed] == list(range(1, 7))
  for a, b in zip(straight, resumed):
    assert a['train/loss'] == b['train/loss'], a['step']
    assert a.get('eval/rewards/margins') == b.get('eval/rewards/margins')
  # The first step's policy is its reference, whose log-probs another program computed.
  assert straight[0]['train/rewards/margins'] == pytest.approx(0.0, abs=1e-5)
  assert straight[0]['train/loss'] == pytest.approx(np.log(2), rel=1e-5)
  assert straight[-1]['eval/rewards/margins'] > straight[2]['eval/rewards/margins'] > 0


def test_dpo_batches_hold_pairs_and_bad_pairs_name_their_line(tmp_path):
  config = dpo_config(tmp_path)
  batch = next(pipeline.make_train_iterator(config, tokenizers.ByteTokenizer(), 0, 1))
  assert batch['chosen_inputs'].shape == batch['rejected_inputs'].shape == (8, 24)
  assert batch['mask'].shape == (8,)
  with open(config.data.path, 'a', encoding='utf-8') as f:
    f.write(json.dumps({'prompt': 'q', 'chosen': 'same', 'rejected': 'same'}) + '\n')
  with pytest.raises(ValueError, match=r"pairs.jsonl:161: field 'chosen' equals field 'rejected'"):
    pipeline.make_train_iterator(config, tokenizers.ByteTokenizer(), 0, 1)


def test_configs_dpo_hf_trains_a_hugging_face_llama_through_lora(tmp_path):
  pytest.importorskip('transformers')
  from tests.conftest import save_tiny_hf_llama  # pylint: disable=g-import-not-at-top
  save_tiny_hf_llama(tmp_path / 'hf')
  config = importlib.import_module('configs.dpo_hf').get_config(str(tmp_path / 'hf'))
  config.update(total_steps=2, batch_size=8, seq_len=32, eval_every_steps=2, eval_batches=1,
                checkpoint_every_steps=2)
  config.lora.targets = ('q', 'v')
  config.data.path = dpo_config(tmp_path).data.path
  last = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert np.isfinite(last['train/loss']) and 'eval/rewards/accuracies' in last
