"""Distillation (config.objective='distill', objectives.distill, lepton_jax/distill.py): the loss
against numpy, zero loss for a student equal to its teacher, a smaller student distilled in the
same step (bf16 and int8 teachers too), exact resume with a teacher, and the errors."""
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import checkpoint, objectives, train
from tests.conftest import (read_metrics, save_tiny_hf_llama, tiny_config,
                            train_preempted_and_resumed)


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize('top_k', [0, 5])
def test_the_loss_is_the_temperature_scaled_kl_plus_cross_entropy(top_k):
  rng = np.random.default_rng(0)
  student_BTV, teacher_BTV = (rng.normal(size=(2, 6, 11)).astype(np.float32) * 3 for _ in '01')
  targets_BT = rng.integers(0, 11, size=(2, 6))
  mask_BT = (rng.random((2, 6)) > 0.3).astype(np.float32)
  temperature, alpha = 2.5, 0.7
  loss = objectives.distill(None, temperature=temperature, alpha=alpha, top_k=top_k).loss
  loss_sum, sums = loss(lambda *_: jnp.asarray(student_BTV), lambda *_: jnp.asarray(teacher_BTV),
                        {'inputs': jnp.zeros((2, 6), jnp.int32), 'targets': targets_BT,
                         'mask': mask_BT})
  s, t = student_BTV / temperature, teacher_BTV / temperature
  if top_k:  # Both distributions over the teacher's k most likely tokens.
    index = np.argsort(-teacher_BTV, axis=-1)[..., :top_k]
    s, t = np.take_along_axis(s, index, -1), np.take_along_axis(t, index, -1)
  log_p, log_q = log_softmax(t), log_softmax(s)
  kl_BT = (np.exp(log_p) * (log_p - log_q)).sum(-1)
  ce_BT = -np.take_along_axis(log_softmax(student_BTV), targets_BT[..., None], -1)[..., 0]
  expected = (alpha * temperature ** 2 * kl_BT + (1 - alpha) * ce_BT) * mask_BT
  np.testing.assert_allclose(loss_sum, expected.sum(), rtol=1e-5)
  np.testing.assert_allclose(sums['kl'], (kl_BT * mask_BT).sum(), rtol=1e-5)
  np.testing.assert_allclose(sums['cross_entropy'], (ce_BT * mask_BT).sum(), rtol=1e-5)
  assert float(sums['tokens']) == mask_BT.sum()


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  """A tiny run trained 12 steps, checkpointed at 6 and 12: the teacher."""
  tmp_path = tmp_path_factory.mktemp('teacher')
  config = tiny_config(tmp_path, total_steps=12, checkpoint_every_steps=6)
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  return tmp_path, str(tmp_path / 'run')


def distill_config(tmp_path, teacher_dir, **overrides):
  return tiny_config(tmp_path, objective='distill', **{
      'distill.teacher': f'workdir:{teacher_dir}', 'distill.temperature': 2.0, **overrides})


def test_a_student_equal_to_its_teacher_has_zero_distillation_loss(teacher, tmp_path):
  _, teacher_dir = teacher
  config = distill_config(tmp_path, teacher_dir, total_steps=1, init_from=f'workdir:{teacher_dir}',
                          **{'distill.alpha': 1.0})
  metrics = train.train_and_evaluate(config, str(tmp_path / 'student'))
  assert abs(metrics['train/loss']) < 1e-6 and abs(metrics['train/kl']) < 1e-6, metrics
  assert metrics['train/cross_entropy'] > 0.1  # The data loss is there, at weight 0.


@pytest.mark.parametrize('teacher_fields', [{}, {'distill.teacher_dtype': 'bfloat16',
                                                 'distill.teacher_quant': 'int8'}])
def test_a_smaller_student_learns_from_the_teacher_and_resumes_exactly(teacher, tmp_path,
                                                                       monkeypatch,
                                                                       teacher_fields):
  _, teacher_dir = teacher
  config = distill_config(tmp_path, teacher_dir, total_steps=6, checkpoint_every_steps=3,
                          **{'model.num_layers': 1, 'model.d_model': 16, 'model.head_dim': 8,
                             'model.d_ff': 32, 'distill.alpha': 0.8, 'distill.top_k': 8},
                          **teacher_fields)
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  losses = [r['train/kl'] for r in read_metrics(tmp_path / 'straight') if 'train/kl' in r]
  assert losses[-1] < losses[0]
  train_preempted_and_resumed(config, tmp_path / 'resumed', monkeypatch, 2)
  assert ([r['train/loss'] for r in read_metrics(tmp_path / 'straight')] ==
          [r['train/loss'] for r in read_metrics(tmp_path / 'resumed')])
  assert not (tmp_path / 'straight' / 'frozen').exists()  # The teacher is not copied.
  if teacher_fields:
    return
  # Another teacher (the same run's step 6) is refused on resume.
  config.total_steps = 8
  config.distill.teacher = f'workdir:{teacher_dir}:6'
  with pytest.raises(ValueError, match=r'was distilled from workdir:.* \(fingerprint \w+\), but '
                     r'config.distill.teacher gives workdir:.*:6 \(fingerprint \w+\)'):
    train.train_and_evaluate(config, str(tmp_path / 'straight'))
  assert checkpoint.Checkpointer(str(tmp_path / 'straight')).latest_step() == 6


def test_a_teacher_of_another_vocabulary_is_a_one_line_error(tmp_path):
  pytest.importorskip('transformers')
  save_tiny_hf_llama(tmp_path / 'hf')
  config = tiny_config(tmp_path, objective='distill', **{'distill.teacher': f'hf:{tmp_path}/hf'})
  with pytest.raises(ValueError, match=(
      rf"^config.distill.teacher='hf:{tmp_path}/hf': its vocabulary \(hf {tmp_path}/hf with \d+ "
      r'tokens, model vocab_size 320\) is not the student\'s \(bytes with \d+ tokens, model '
      r'vocab_size \d+\); distillation compares logits token by token, so both need one '
      r'tokenizer$')):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


@pytest.mark.parametrize('overrides, message', [
    ({'distill.teacher': ''}, r"^config.objective='distill' needs config.distill.teacher"),
    ({'distill.teacher': 'gs://x'}, r"^config.distill.teacher='gs://x': expected 'workdir:DIR"),
    ({'distill.teacher': 'workdir:/x', 'distill.temperature': 0.0},
     r'^config.distill.temperature=0.0: must be positive$'),
    ({'distill.teacher': 'workdir:/x', 'distill.alpha': 1.5},
     r'^config.distill.alpha=1.5: must be in \[0, 1\]$'),
    ({'distill.teacher': 'workdir:/x', 'distill.top_k': -1},
     r'^config.distill.top_k=-1: must be >= 0 \(0: every token\)$'),
    ({'distill.teacher': 'workdir:/x', 'distill.teacher_quant': 'int4'},
     r"^config.distill.teacher_quant='int4': expected one of"),
])
def test_bad_distill_configs_are_one_line_errors(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(tmp_path, objective='distill', **overrides),
                             str(tmp_path / 'run'))
