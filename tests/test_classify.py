"""The classify objective: the head's pooling, cross-entropy, accuracy, macro-F1 and confusion
matrix against scikit-learn, head-only / LoRA / full training, exact resume, and bad records."""
import importlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import config_lib, lora, objectives, sharding, train, train_state, tree
from lepton_jax.data import pipeline, tokenizers
from lepton_jax.evals import objective as objective_eval
from lepton_jax.model import ModelConfig, Transformer
from tests.conftest import read_metrics, tiny_config

metrics = pytest.importorskip('sklearn.metrics')
LABELS = ('red', 'green', 'blue')


def classifier(pool='last', positions='rope'):
  cfg = tiny_config(**{'model.vocab_size': 257, 'model.head': 'classify', 'model.num_labels': 3,
                       'model.pool': pool, 'model.pad_id': 0, 'model.positions': positions}).model
  model = Transformer(ModelConfig.from_config(cfg))
  return model, model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))


@pytest.mark.parametrize('pool', ['last', 'mean'])
@pytest.mark.parametrize('positions', ['rope', 'learned'])
def test_left_and_right_padding_change_no_logit_and_mean_pooling_averages_the_real_tokens(
    pool, positions):
  model, variables = classifier(pool, positions)
  tokens = np.random.default_rng(0).integers(1, 257, (3, 10))
  lengths = (10, 6, 1)
  padded = np.where(np.arange(10) < np.asarray(lengths)[:, None], tokens, 0)
  logits = np.asarray(model.apply(variables, jnp.asarray(padded)))
  assert logits.shape == (3, 3) and logits.dtype == np.float32
  for row, length in enumerate(lengths):
    alone = model.apply(variables, jnp.asarray(padded[row:row + 1, :length]))
    np.testing.assert_allclose(alone[0], logits[row], atol=1e-5)
  left = np.stack([np.roll(row, 10 - length) for row, length in zip(padded, lengths)])
  assert (left[1, :4] == 0).all() and (left[1, 4:] == padded[1, :6]).all()
  np.testing.assert_allclose(model.apply(variables, jnp.asarray(left)), logits, atol=1e-5)
  if pool == 'mean':  # Not the last token's logits: the mean pools every real token.
    last, _ = classifier('last', positions)
    assert not np.allclose(logits, last.apply(variables, jnp.asarray(padded)), atol=1e-3)


def test_loss_accuracy_macro_f1_and_confusion_equal_scikit_learn(tmp_path):
  model, variables = classifier()
  rng = np.random.default_rng(1)
  batch = {'inputs': jnp.asarray(rng.integers(1, 257, (12, 8))),
           'labels': jnp.asarray(rng.integers(0, 3, 12)),
           'mask': jnp.asarray([1.0] * 10 + [0.0] * 2)}  # Two rows of eval padding.
  policy = lambda tokens, *unused: model.apply(variables, tokens)
  loss_sum, sums = objectives.classify().loss(policy, None, batch)
  logits = np.asarray(model.apply(variables, batch['inputs']))[:10]
  labels = np.asarray(batch['labels'])[:10]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(loss_sum / sums['examples'],
                             metrics.log_loss(labels, probs, labels=[0, 1, 2]), rtol=1e-5)
  predicted = logits.argmax(-1)
  np.testing.assert_array_equal(sums['confusion'],
                                metrics.confusion_matrix(labels, predicted, labels=[0, 1, 2]))
  assert sums['accuracy'] / sums['examples'] == metrics.accuracy_score(labels, predicted)
  for confusion in (np.asarray(sums['confusion']), np.diag([3, 0, 2]), np.ones((3, 3))):
    true = np.repeat(np.arange(3), confusion.sum(1).astype(int))
    pred = np.concatenate([np.repeat(np.arange(3), row.astype(int)) for row in confusion])
    assert objective_eval.macro_f1(confusion) == pytest.approx(
        metrics.f1_score(true, pred, average='macro', labels=[0, 1, 2], zero_division=0))
  objective_eval.plot_confusion(sums['confusion'], LABELS, str(tmp_path / 'confusion.png'))
  assert (tmp_path / 'confusion.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def write_colours(path, count=240):
  """A colour word somewhere in each text decides its label."""
  rng = np.random.default_rng(0)
  with open(path, 'w', encoding='utf-8') as f:
    for i in range(count):
      label = LABELS[i % 3]
      words = ['the', 'a', 'small', 'big', 'old'] * 2
      words.insert(int(rng.integers(0, len(words))), label)
      f.write(json.dumps({'text': ' '.join(words[:int(rng.integers(5, 11))] + [label]),
                          'label': label}) + '\n')
  return str(path)


def classify_config(tmp_path, **overrides):
  return tiny_config(tmp_path, **{
      'objective': 'classify', 'model.head': 'classify', 'data.source': 'jsonl',
      'data.format': 'classification', 'data.labels': LABELS, 'seq_len': 64,
      'model.max_seq_len': 64, 'data.path': write_colours(tmp_path / 'colours.jsonl'),
      **overrides})


def test_classification_batches_are_right_padded_rows_with_labels(tmp_path):
  config = classify_config(tmp_path)
  batch = next(pipeline.make_train_iterator(config, tokenizers.ByteTokenizer(), 0, 1))
  assert batch['inputs'].shape == (8, 64) and batch['labels'].shape == (8,)
  eos = tokenizers.ByteTokenizer().eos_id  # The default pad id.
  for row, label in zip(batch['inputs'], batch['labels']):
    text = bytes(row[row != eos].tolist()).decode()
    assert text.endswith(LABELS[label]) and (row[len(text):] == eos).all()
  with open(config.data.path, 'a', encoding='utf-8') as f:
    f.write(json.dumps({'text': 'purple rain', 'label': 'purple'}) + '\n')
  with pytest.raises(ValueError, match=r"colours.jsonl:241: field 'label'=\"purple\" is not in "
                     r"data.labels=\('red', 'green', 'blue'\)"):
    pipeline.make_train_iterator(config, tokenizers.ByteTokenizer(), 0, 1)


@pytest.mark.parametrize('overrides,trains', [
    ({}, None),  # Full fine-tuning: everything.
    ({'lora.targets': ('q', 'v')}, r'.*lora_(a|b)|score/kernel'),  # Adapters and the new head.
    ({'trainable': ('score/.*',)}, r'score/kernel'),  # The head alone, the base frozen.
])
def test_what_trains_in_each_mode(tmp_path, overrides, trains):
  config = classify_config(tmp_path, **overrides)
  cfg = ModelConfig.from_config(config_lib.resolve_vocab(
      config.model, tokenizers.ByteTokenizer(), config.data.labels), config.lora)
  params = sharding.unbox_abstract(train_state.boxed_variables(Transformer(cfg), 8))['params']
  mask = train_state.trainable_mask(params, lora.trainable_patterns(config))
  for name, trainable in zip(tree.names(params), jax.tree.leaves(mask)):
    assert trainable == (trains is None or re.fullmatch(trains, name) is not None), name


@pytest.mark.parametrize('overrides', [{}, {'lora.targets': ('q', 'v')}])
def test_a_classify_run_learns_and_resumes_exactly(tmp_path, monkeypatch, overrides):
  config = classify_config(tmp_path, total_steps=12, checkpoint_every_steps=100,
                           eval_every_steps=6, grad_accum_steps=2, batch_size=16,
                           **{'optimizer.learning_rate': 1e-2, **overrides})
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
    assert a.get('eval/macro_f1') == b.get('eval/macro_f1')
  last = straight[-1]
  assert {'eval/loss', 'eval/accuracy', 'eval/macro_f1', 'train/accuracy'} <= last.keys()
  assert last['train/loss'] < straight[0]['train/loss']


def test_configs_classify_hf_trains_a_head_on_a_hugging_face_llama_that_exports_and_reloads(
    tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from lepton_jax import hf, sample  # pylint: disable=g-import-not-at-top
  from tests.conftest import save_tiny_hf_llama  # pylint: disable=g-import-not-at-top
  save_tiny_hf_llama(tmp_path / 'hf')
  config = importlib.import_module('configs.classify_hf').get_config(str(tmp_path / 'hf'))
  config.update(total_steps=2, batch_size=8, seq_len=64, eval_every_steps=2, eval_batches=1,
                checkpoint_every_steps=2)
  config.data.update(path=write_colours(tmp_path / 'colours.jsonl'), labels=LABELS)
  last = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 0 <= last['eval/accuracy'] <= 1 and np.isfinite(last['eval/loss'])
  model, variables, tokenizer = sample.load(config, str(tmp_path / 'run'))
  hf.save(model, variables, str(tmp_path / 'export'), tokenizer, labels=LABELS)
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / 'export').eval()
  assert reloaded.config.id2label == dict(enumerate(LABELS))
  ids = [tokenizer.encode(text) for text in ('the small red', 'a big old blue thing')]
  # Right-padded with the run's pad id.
  tokens = np.full((2, max(map(len, ids)) + 3), model.cfg.pad_id)
  for row, row_ids in enumerate(ids):
    tokens[row, :len(row_ids)] = row_ids
  with torch.no_grad():
    expected = reloaded(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(model.apply(variables, jnp.asarray(tokens)), expected, atol=1e-4)


def test_a_classify_run_starts_from_a_language_model_run_with_a_new_head(tmp_path):
  from lepton_jax import evaluate, sample  # pylint: disable=g-import-not-at-top
  short = {'total_steps': 2, 'checkpoint_every_steps': 2, 'eval_every_steps': 2,
           'eval_batches': 1}
  lm = tiny_config(tmp_path, **short)
  train.train_and_evaluate(lm, str(tmp_path / 'lm'))
  config = classify_config(tmp_path, **short, seq_len=32, init_from=f'workdir:{tmp_path}/lm',
                           trainable=('score/.*',), **{'model.max_seq_len': 32})
  train.train_and_evaluate(config, str(tmp_path / 'classify'))
  _, lm_variables, _ = sample.load(lm, str(tmp_path / 'lm'))
  model, variables, tokenizer = sample.load(config, str(tmp_path / 'classify'))
  # lepton-eval's cost times the classify eval step on a batch of labelled records.
  metrics = evaluate.evaluate(config, model, variables, tokenizer)
  assert metrics['cost/forward_tokens_per_sec'] > 0 and metrics['cost/eval_step_peak_bytes'] > 0
  assert 'eval/macro_f1' in metrics
  source = dict(zip(tree.names(lm_variables['params']), jax.tree.leaves(lm_variables['params'])))
  names = tree.names(variables['params'])
  assert 'score/kernel' in names and 'score/kernel' not in source
  for name, value in zip(names, jax.tree.leaves(variables['params'])):
    if name != 'score/kernel':  # The frozen base is the language model's.
      np.testing.assert_array_equal(value, source[name], err_msg=name)
