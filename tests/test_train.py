"""End-to-end training: learning, metrics, exact resume, preemption, and bad input."""
import logging as std_logging
import os
import pathlib
import signal
import subprocess
import sys
import time

from absl import logging as absl_logging
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import checkpoint, cli, optim, sharding, steps, train, train_state, tree
from lepton_jax.model import ModelConfig, Transformer
from tests.conftest import TEXT, read_metrics, tiny_config

def test_short_run_learns_and_logs(tmp_path):
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(tmp_path, total_steps=40), str(workdir))
  records = read_metrics(workdir)
  assert [r['step'] for r in records] == list(range(1, 41))
  assert records[-1]['train/loss'] < 0.6 * records[0]['train/loss']
  for key in ('train/loss', 'learning_rate', 'train/grad_norm'):
    assert key in records[0]
  assert {'tokens_per_sec', 'mfu'} <= records[-1].keys()
  evaluated = [r for r in records if 'eval/loss' in r]
  assert [r['step'] for r in evaluated] == [10, 20, 30, 40]
  assert evaluated[-1]['eval/loss'] < evaluated[0]['eval/loss']
  assert evaluated[-1]['eval/perplexity'] == pytest.approx(np.exp(evaluated[-1]['eval/loss']))
  assert 0.0 < evaluated[-1]['eval/accuracy'] <= 1.0
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['20', '30', '40']  # keep_checkpoints=3


def test_eval_runs_on_its_own_schedule(tmp_path):
  workdir = tmp_path / 'run'
  config = tiny_config(tmp_path, total_steps=12, log_every_steps=4, eval_every_steps=6)
  train.train_and_evaluate(config, str(workdir))
  records = read_metrics(workdir)
  assert [r['step'] for r in records] == [4, 6, 8, 12]
  assert [r['step'] for r in records if 'eval/loss' in r] == [6, 12]
  assert all('tokens_per_sec' in r for r in records)


@pytest.mark.parametrize('streaming', [False, True])
def test_resume_after_preemption_is_exact(tmp_path, monkeypatch, streaming):
  config = tiny_config(tmp_path, total_steps=24, checkpoint_every_steps=100,
                       **{'model.dropout': 0.1, 'data.streaming': streaming})
  train.train_and_evaluate(config, str(tmp_path / 'straight'))

  interrupted = str(tmp_path / 'interrupted')
  monkeypatch.setattr(train.PreemptionWatch, 'reached', lambda self, step: step == 13)
  train.train_and_evaluate(config, interrupted)
  assert os.listdir(os.path.join(interrupted, 'checkpoints')) == ['13']
  monkeypatch.undo()
  train.train_and_evaluate(config, interrupted)  # Same command again: resumes at step 13.

  straight, resumed = read_metrics(tmp_path / 'straight'), read_metrics(interrupted)
  assert [r['step'] for r in resumed] == list(range(1, 25))
  for a, b in zip(straight, resumed):
    assert a['train/loss'] == b['train/loss'], a['step']  # Bit for bit, dropout included.
    assert a.get('eval/loss') == b.get('eval/loss')


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
  losses = {}
  for accum in (1, 2):
    workdir = tmp_path / f'accum{accum}'
    train.train_and_evaluate(tiny_config(tmp_path, total_steps=5, batch_size=16,
                                         grad_accum_steps=accum),
                             str(workdir))
    losses[accum] = [r['train/loss'] for r in read_metrics(workdir)]
  np.testing.assert_allclose(losses[1], losses[2], rtol=1e-5)


@pytest.mark.parametrize('optimizer,schedule,learning_rate',
                         [('adafactor', 'linear', 3e-2), ('sgd', 'wsd', 0.3)])
def test_other_optimizers_and_schedules_train(tmp_path, optimizer, schedule, learning_rate):
  config = tiny_config(tmp_path, total_steps=30, **{
      'optimizer.name': optimizer, 'optimizer.schedule': schedule, 'optimizer.cooldown_steps': 10,
      'optimizer.learning_rate': learning_rate, 'z_loss': 1e-4})
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  records = read_metrics(tmp_path / 'run')
  assert records[-1]['train/loss'] < 0.7 * records[0]['train/loss']


def sharded_layout(config):
  """(model, tx, layout) of `config` on its mesh."""
  model = Transformer(ModelConfig.from_config(config.model))
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  mesh = sharding.make_mesh(config.mesh)
  with sharding.use_mesh(mesh, config.mesh.rules):
    layout = train_state.make_layout(model, tx, mesh, config.mesh.rules, config.seq_len,
                                     config.trainable)
  return model, tx, layout


def test_checkpoint_round_trip_keeps_values_and_shardings(tmp_path):
  config = tiny_config(tmp_path, **{'model.vocab_size': 264, 'mesh.data': 1, 'mesh.fsdp': 8})
  model, tx, layout = sharded_layout(config)
  state, frozen = train_state.init_state(model, tx, config.seed, config.seq_len, layout)
  data_iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  [next(data_iterator) for _ in range(3)]
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  ckpt.save(7, state, data_iterator, checkpoint.describe(layout.variables, layout.trainable_mask))
  ckpt.wait()
  # Each process writes its own data position (streaming pipelines differ per process).
  data_dir = tmp_path / 'checkpoints' / '7' / 'data'
  assert (data_dir / 'process_0-of-1.json').exists()
  fresh_iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  restored, restored_frozen = ckpt.restore(7, layout, fresh_iterator)
  assert restored_frozen == frozen == {}
  for name, a, b in zip(tree.names(state), jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b, err_msg=name)
    assert a.sharding == b.sharding, name
  assert tuple(restored.trainable['embed']['embedding'].sharding.spec) == ('tensor', 'fsdp')
  assert next(fresh_iterator) == 3

  # Saved by 2 processes: a position every process shares restores in any process count; a
  # per-process (streaming) one only in the count it was saved with.
  for i in range(2):
    (data_dir / f'process_{i}-of-2.json').write_text((data_dir / 'process_0-of-1.json').read_text())
  (data_dir / 'process_0-of-1.json').unlink()
  fresh_iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  ckpt.restore(7, layout, fresh_iterator, data_state_is_global=True)
  assert next(fresh_iterator) == 3
  with pytest.raises(ValueError, match='data positions of 2 processes, not 1: resume a streaming'):
    ckpt.restore(7, layout, fresh_iterator)
  ckpt.close()


def nan_loss_at(monkeypatch, bad_steps) -> None:
  """Makes the loss of `bad_steps` (1-based) NaN, through a loss mask of NaNs."""
  train_step = steps.train_step

  def train_step_with_nans(state, frozen, batch, **kwargs):
    is_bad = jnp.isin(state.step + 1, jnp.asarray(bad_steps))
    mask = jnp.where(is_bad, jnp.nan, jnp.ones(batch['targets'].shape))
    return train_step(state, frozen, {**batch, 'mask': mask}, **kwargs)

  monkeypatch.setattr(steps, 'train_step', train_step_with_nans)


def test_nonfinite_step_stops_the_run_before_it_is_saved(tmp_path, monkeypatch):
  nan_loss_at(monkeypatch, [6])
  workdir = tmp_path / 'run'
  config = tiny_config(tmp_path, total_steps=10, checkpoint_every_steps=1, keep_checkpoints=10)
  with pytest.raises(FloatingPointError, match=r'^step 6 is not finite \(loss nan, gradient norm '
                     r'nan, learning rate [\d.]+\); stopped before saving it'):
    train.train_and_evaluate(config, str(workdir))
  assert checkpoint.Checkpointer(str(workdir), keep=10).all_steps() == [1, 2, 3, 4, 5]
  assert [r['step'] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5]


def test_skip_drops_nonfinite_updates_counts_them_and_stops_after_too_many(tmp_path, monkeypatch):
  nan_loss_at(monkeypatch, [4, 7, 8, 9])
  workdir = tmp_path / 'run'
  config = tiny_config(tmp_path, total_steps=12, checkpoint_every_steps=1, keep_checkpoints=20,
                       nonfinite='skip', max_consecutive_skips=3, **{'model.vocab_size': 257})
  with pytest.raises(FloatingPointError, match=r'step 9: 3 non-finite steps in a row'):
    train.train_and_evaluate(config, str(workdir))
  records = read_metrics(workdir)
  assert [r['train/skipped_steps'] for r in records] == [0, 0, 0, 1, 1, 1, 2, 3]
  ckpt = checkpoint.Checkpointer(str(workdir), keep=20)
  model, tx, layout = sharded_layout(config)
  saved = {step: ckpt.restore(step, layout)[0] for step in (3, 4, 5, 7, 8)}
  for before, skipped in ((3, 4), (7, 8)):  # A skipped step changes only the step count.
    for a, b in zip(jax.tree.leaves((saved[before].trainable, saved[before].opt_state)),
                    jax.tree.leaves((saved[skipped].trainable, saved[skipped].opt_state))):
      np.testing.assert_array_equal(a, b)
    assert int(saved[skipped].step) == skipped
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), saved[4].trainable,
                                       saved[5].trainable))
  assert all(moved)  # Training goes on after a skipped step.


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = tmp_path / 'run'
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(TEXT)
  cmd = [sys.executable, '-m', 'lepton_jax.train', '--config=configs/stdlib_tiny.py',
         f'--workdir={workdir}', '--config.data.source=text', f'--config.data.path={corpus}',
         '--config.data.tokenizer=bytes', '--config.total_steps=100000',
         '--config.log_every_steps=1', '--config.model.num_layers=1', '--config.model.d_model=32',
         '--config.model.d_ff=64', '--config.batch_size=8', '--config.seq_len=32']
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  proc = subprocess.Popen(cmd, cwd=pathlib.Path(__file__).parent.parent, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 120
  metrics_file = workdir / 'metrics.jsonl'
  while not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, output
  steps = [int(s) for s in os.listdir(workdir / 'checkpoints')]
  assert len(steps) == 1 and 3 <= steps[0] < 100000
  assert 'Preempted at step' in output


def test_refuses_a_workdir_holding_another_model(tmp_path):
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(tmp_path, total_steps=10), str(workdir))
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob('*') if 'checkpoints' in p.parts}
  with pytest.raises(ValueError, match=r'different model: params/layers_2/attn/key/kernel is in '
                     r'the model but not in the checkpoint; use a new --workdir'):
    train.train_and_evaluate(tiny_config(tmp_path, total_steps=20, **{'model.num_layers': 3}),
                             str(workdir))
  after = {p: p.stat().st_mtime_ns for p in workdir.rglob('*') if 'checkpoints' in p.parts}
  assert before == after


@pytest.mark.parametrize('overrides,message', [
    ({'batch_size': 12}, r'batch_size=12 is not divisible by the data-parallel size 8'),
    ({'seq_len': 64}, r'seq_len=64 exceeds config.model.max_seq_len=32'),
    ({'model.vocab_size': 100}, r'tokenizer has 257 tokens but config.model.vocab_size=100'),
    ({'data.path': '/nonexistent/corpus.txt'}, r'/nonexistent/corpus.txt'),
    ({'data.tokenizer': 'sentencepiece', 'data.tokenizer_path': '/nonexistent/spm.model'},
     r'/nonexistent/spm.model'),
    ({'mesh.fsdp': 3}, r'config.mesh: .* cannot fill 8 devices'),
    ({'mesh.data': 2}, r'config.mesh: axis sizes .* multiply to 2, but there are 8 devices'),
    ({'mesh.rules': (('batch', 'pipeline'),)}, r"unknown mesh axis 'pipeline'"),
    ({'optimizer.name': 'adam'}, r"config.optimizer.name='adam'"),
    ({'data.streaming': True, 'data.read_threads': 0}, r'config.data.read_threads=0: must be pos'),
    ({'data.streaming': True, 'data.shuffle_window': -1}, r'config.data.shuffle_window=-1: must'),
])
def test_bad_input_fails_with_a_clear_error(tmp_path, overrides, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    train.train_and_evaluate(tiny_config(tmp_path, **overrides), str(tmp_path / 'run'))


def test_cli_names_a_mistyped_config_key(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'lepton_jax.train', '--config=configs/stdlib_tiny.py',
       f'--workdir={tmp_path}', '--config.model.num_layer=3'],
      cwd=pathlib.Path(__file__).parent.parent, capture_output=True, text=True, timeout=60)
  assert result.returncode != 0
  last_line = result.stderr.strip().splitlines()[-1]
  assert "unknown config key 'num_layer'" in last_line and 'num_layers' in last_line


def test_library_info_logs_are_dropped_but_ours_and_warnings_kept():
  handler = absl_logging.get_absl_handler()
  filters = list(handler.filters)
  record = lambda level, path: std_logging.LogRecord('jax', level, path, 1, 'message', None, None)
  try:
    cli.quiet_library_info_logs()
    assert not handler.filter(record(std_logging.INFO, '/site-packages/jax/_src/xla_bridge.py'))
    assert handler.filter(record(std_logging.WARNING, '/site-packages/jax/_src/xla_bridge.py'))
    assert handler.filter(record(std_logging.INFO, train.__file__))
    assert handler.filter(record(std_logging.INFO, cli.__file__))
  finally:
    handler.filters[:] = filters
