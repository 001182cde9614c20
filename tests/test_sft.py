"""The sft objective: masked cross-entropy over loss tokens, exact for packed rows and under
gradient accumulation (against numpy), and an sft run that resumes exactly."""
import dataclasses
import functools
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lepton_jax import objectives, steps, train, train_state
from lepton_jax.data import formats
from lepton_jax.data import packing
from lepton_jax.data import tokenizers
from lepton_jax.model import ModelConfig, Transformer
from tests.conftest import read_metrics, tiny_config

BYTES = tokenizers.ByteTokenizer()
PAIRS = [('3+4=', '7'), ('12+30=', '42'), ('why? ', 'because it is so'), ('x', 'yz' * 6)]


def examples():
  return [formats.Example(np.asarray(list((p + c).encode()) + [BYTES.eos_id], np.int32),
                          np.asarray([0] * len(p) + [1] * (len(c) + 1), bool))
          for p, c in PAIRS]


def model_and_variables(**model_overrides):
  config = tiny_config(**{'model.vocab_size': 257,
                          **{f'model.{k}': v for k, v in model_overrides.items()}})
  model = Transformer(ModelConfig.from_config(config.model))
  return model, model.init(jax.random.key(1), jnp.zeros((1, 32), jnp.int32))


def as_batch(rows: packing.Rows, row_ids=None, segments=True) -> dict:
  row_ids = np.arange(len(rows)) if row_ids is None else np.asarray(row_ids)
  batch = {'inputs': rows.inputs[row_ids], 'targets': rows.targets[row_ids],
           'positions': rows.positions[row_ids],
           'mask': rows.loss_mask[row_ids].astype(np.float32)}
  if segments:
    batch['segment_ids'] = rows.segment_ids[row_ids]
  return {k: jnp.asarray(v) for k, v in batch.items()}


def loss_sum_and_grads(model, variables, batch):
  grad_fn = jax.jit(jax.value_and_grad(
      lambda v, b: steps.summed_loss(v, model, b, jax.random.key(0), objectives.lm(), True), has_aux=True))
  (loss_sum, sums), grads = grad_fn(variables, batch)
  return loss_sum, sums['tokens'], grads


@pytest.mark.parametrize('model_overrides', [
    {}, {'attention': 'dot_product'}, {'positions': 'learned', 'sliding_window': 5}])
def test_a_packed_batch_gives_the_loss_and_gradients_of_its_examples_one_by_one(model_overrides):
  model, variables = model_and_variables(**model_overrides)
  rows = packing.pack(examples(), seq_len=32, packing=True, side='right', pad_id=BYTES.eos_id)
  assert len(rows) == 2 and rows.segment_ids.max() >= 2  # Rows of several examples, padded.
  packed = loss_sum_and_grads(model, variables, as_batch(rows))
  # Each example alone in its row, causal attention only: rows never meet inside the model.
  alone = packing.pack(examples(), seq_len=32, packing=False, side='right', pad_id=BYTES.eos_id)
  assert len(alone) == len(examples())
  one_by_one = loss_sum_and_grads(model, variables, as_batch(alone, segments=False))
  np.testing.assert_allclose(packed[0], one_by_one[0], rtol=1e-5)
  assert packed[1] == one_by_one[1] == sum(e.loss_mask[1:].sum() for e in examples())
  for a, b in zip(jax.tree.leaves(packed[2]), jax.tree.leaves(one_by_one[2])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('attention', ['xla', 'dot_product'])
def test_a_packed_row_never_attends_across_examples(attention):
  model, variables = model_and_variables(attention=attention)
  rows = packing.pack(examples(), seq_len=32, packing=True, side='right', pad_id=BYTES.eos_id)
  batch = as_batch(rows)
  logits = lambda inputs: model.apply(variables, inputs, batch['positions'],
                                      segment_ids_BT=batch['segment_ids'])
  first = np.asarray(batch['segment_ids']) == 1
  changed = np.where(first, (np.asarray(batch['inputs']) + 17) % 256, batch['inputs'])
  before, after = logits(batch['inputs']), logits(jnp.asarray(changed))
  np.testing.assert_array_equal(np.asarray(before)[~first], np.asarray(after)[~first])
  assert not np.allclose(np.asarray(before)[first], np.asarray(after)[first])


def test_cudnn_attention_refuses_segment_ids():
  model, variables = model_and_variables()
  cudnn = Transformer(dataclasses.replace(model.cfg, attention='cudnn'))
  tokens = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="segment ids .* need config.model.attention 'xla' or"):
    cudnn.apply(variables, tokens, segment_ids_BT=jnp.ones((1, 8), jnp.int32))


def reference_loss(logits_BTV, batch) -> float:
  """Masked cross-entropy per loss token over the whole batch, in numpy (float64)."""
  logits = np.asarray(logits_BTV, np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  targets, mask = np.asarray(batch['targets']), np.asarray(batch['mask'])
  picked = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  return float(-(picked * mask).sum() / mask.sum())


def test_sft_loss_is_per_loss_token_over_the_global_batch_whatever_the_accumulation():
  model, variables = model_and_variables()
  # One example per row: the first two rows hold far fewer loss tokens than the last two.
  rows = packing.pack(examples(), seq_len=32, packing=False, side='right', pad_id=BYTES.eos_id)
  batch = as_batch(rows, segments=False)
  tx = optax.sgd(0.5)
  state = train_state.TrainState(step=jnp.int32(0), trainable=variables['params'],
                                 opt_state=tx.init(variables['params']),
                                 rng=jax.random.key_data(jax.random.key(0)))
  results = {}
  for accum in (1, 2):
    step = jax.jit(functools.partial(
        steps.train_step, model=model, tx=tx, schedule=optax.constant_schedule(0.5),
        grad_accum_steps=accum, objective=objectives.lm(), skip_nonfinite=False))
    new_state, metrics = step(state, {}, batch)
    results[accum] = (float(metrics['train/loss']), new_state.trainable)
  expected = reference_loss(model.apply(variables, batch['inputs'], batch['positions']), batch)
  for accum in (1, 2):
    np.testing.assert_allclose(results[accum][0], expected, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[2][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  halves = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
  mean_of_means = np.mean([reference_loss(model.apply(variables, h['inputs']), h) for h in halves])
  # What averaging micro-batch means would give: far outside the 1e-5 the loss matches to.
  assert abs(mean_of_means - expected) > 1e-3


def write_chats(path, count=120):
  with open(path, 'w', encoding='utf-8') as f:
    for i in range(count):
      messages = [{'role': 'user', 'content': f'add {i} and {i % 7}'},
                  {'role': 'assistant', 'content': str(i + i % 7)}]
      if i % 3 == 0:
        messages = [{'role': 'system', 'content': 'Answer with the sum.'}] + messages
      f.write(json.dumps({'messages': messages}) + '\n')
  return str(path)


def sft_config(tmp_path, **overrides):
  return tiny_config(tmp_path, **{
      'objective': 'sft', 'data.source': 'jsonl', 'data.format': 'chat', 'seq_len': 64,
      'model.max_seq_len': 64,
      'data.path': write_chats(tmp_path / 'chats.jsonl'), **overrides})


def test_sft_run_resumes_exactly(tmp_path, monkeypatch):
  config = sft_config(tmp_path, total_steps=12, checkpoint_every_steps=100, eval_every_steps=6,
                      **{'model.dropout': 0.1})
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
    assert a.get('eval/loss') == b.get('eval/loss')
  assert straight[-1]['train/loss'] < straight[0]['train/loss']


def test_configs_sft_hf_fine_tunes_a_hugging_face_model(tmp_path):
  pytest.importorskip('transformers')
  from tests.conftest import save_tiny_hf_llama  # pylint: disable=g-import-not-at-top
  hf_dir = tmp_path / 'hf'
  save_tiny_hf_llama(hf_dir)
  (hf_dir / 'chat_template.jinja').write_text(
      "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '</s>' }}{% endfor %}")
  config = importlib.import_module('configs.sft_hf').get_config(str(hf_dir))
  config.update(total_steps=2, batch_size=8, seq_len=64, eval_every_steps=2, eval_batches=1,
                checkpoint_every_steps=2)
  config.data.path = write_chats(tmp_path / 'chats.jsonl')
  last = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert np.isfinite(last['train/loss']) and np.isfinite(last['eval/loss'])
