"""A run you can see into (lepton_jax/monitor.py): profiles, memory and data-wait figures, event
times, goodput, the hang watchdog, loss spikes and the W&B writer."""
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import data, monitor, steps, train
from tests.conftest import read_metrics, tiny_config

REPO = pathlib.Path(__file__).parent.parent


def read_timeline(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'timeline.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_profile_of_two_steps_opens_with_their_step_annotations(tmp_path):
  workdir = tmp_path / 'run'
  config = tiny_config(tmp_path, total_steps=6, **{'profile.start_step': 3,
                                                   'profile.num_steps': 2})
  train.train_and_evaluate(config, str(workdir))
  (xplane,) = (workdir / 'profile').glob('plugins/profile/*/*.xplane.pb')
  assert list(xplane.parent.glob('*perfetto_trace.json.gz'))  # What ui.perfetto.dev opens.
  profile = jax.profiler.ProfileData.from_file(str(xplane))
  annotated = sorted(dict(event.stats)['step_num'] for plane in profile.planes
                     for line in plane.lines for event in line.events if event.name == 'train')
  assert annotated == [3, 4]


def test_records_carry_memory_step_time_data_wait_and_event_times(tmp_path):
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(tmp_path, total_steps=10, eval_every_steps=5),
                           str(workdir))
  records = read_metrics(workdir)
  assert [r['step'] for r in records] == list(range(1, 11))
  for r in records:
    assert 0 < r['memory/host_rss_bytes'] <= r['memory/host_peak_rss_bytes']
    assert 'memory/device_bytes_in_use' not in r  # CPU devices report no memory_stats().
  for r in records[1:]:
    assert r['perf/step_seconds'] > 0 and 0 <= r['perf/data_wait_fraction'] <= 1
  assert records[0]['time/compile_seconds'] > 0
  assert [r['step'] for r in records if 'time/eval_seconds' in r] == [5, 10]
  # Saved at step 10 after its metrics were read, and still in step 10's record.
  assert [r['step'] for r in records if 'time/checkpoint_save_seconds' in r] == [10]
  assert (workdir / 'tensorboard').exists()


def test_memory_figures_read_device_stats_where_the_backend_has_them(monkeypatch):
  class Device:
    def __init__(self, in_use, peak):
      self.stats = {'bytes_in_use': in_use, 'peak_bytes_in_use': peak, 'bytes_limit': 10**9}

    def memory_stats(self):
      return self.stats

  monkeypatch.setattr(jax, 'local_devices', lambda: [Device(5, 9), Device(7, 8)])
  figures = monitor.memory_figures()
  assert figures['memory/device_bytes_in_use'] == 7  # The fullest device.
  assert figures['memory/device_peak_bytes_in_use'] == 9


def test_goodput_follows_ml_goodput_measurement_over_a_restart():
  # Segment 1 starts at t=100: 5 s of preparation, a first step of 8 s against 3 s for each
  # later step (5 s program start-up), steps 2-5 in 12 s with an eval and a save of 1 s each
  # outside them, until t=127. Segment 2 starts 10 s later (recovery), restores step 3's
  # checkpoint in 2 s, prepares 1 s more, and runs steps 4-6 in 3 s each until t=149.
  # Steps 4 and 5 of segment 1 (6 s) were lost to the restart.
  timeline = [
      {'event': 'start', 'step': 0, 'time': 100.0},
      {'event': 'first_step', 'step': 1, 'seconds': 8.0, 'start': 105.0, 'time': 113.0},
      {'event': 'eval', 'step': 3, 'seconds': 1.0, 'time': 120.0},
      {'event': 'checkpoint_save', 'step': 3, 'seconds': 1.0, 'time': 121.0},
      {'event': 'steps', 'first': 2, 'step': 5, 'seconds': 12.0, 'time': 127.0},
      {'event': 'start', 'step': 3, 'time': 137.0},
      {'event': 'checkpoint_restore', 'step': 3, 'seconds': 2.0, 'time': 139.0},
      {'event': 'first_step', 'step': 4, 'seconds': 3.0, 'start': 140.0, 'time': 143.0},
      {'event': 'steps', 'first': 5, 'step': 6, 'seconds': 6.0, 'time': 149.0},
      {'event': 'end', 'step': 6, 'time': 149.0},
  ]
  result = monitor.goodput(timeline)
  assert result['total_seconds'] == 49.0
  assert result['productive_seconds'] == 18.0  # Steps 1-3 of segment 1 (3 + 6), 4-6 (9).
  assert result['badput_seconds'] == {
      'eval': 1.0, 'infrastructure_recovery_from_disruption': 10.0, 'other': 0.0,
      'program_startup': 5.0, 'training_prep': 6.0, 'unproductive_checkpoint_restore_time': 2.0,
      'unproductive_checkpoint_save_time': 1.0, 'wasted_progress_from_disruption': 6.0}
  assert result['goodput_percent'] == round(100 * 18 / 49, 2)
  assert (result['segments'], result['disruptions'], result['last_productive_step']) == (2, 1, 6)


def loss_spike_at(monkeypatch, spike_step: int) -> None:
  """Step `spike_step` (1-based) trains on shifted targets: its loss jumps."""
  train_step = steps.train_step

  def train_step_with_a_spike(state, frozen, batch, **kwargs):
    targets = jnp.where(state.step + 1 == spike_step, (batch['targets'] + 97) % 256,
                        batch['targets'])
    return train_step(state, frozen, {**batch, 'targets': targets}, **kwargs)

  monkeypatch.setattr(steps, 'train_step', train_step_with_a_spike)


def test_loss_spike_is_logged_with_its_data_position_and_gradient_norm(tmp_path, monkeypatch):
  loss_spike_at(monkeypatch, 25)
  workdir = tmp_path / 'run'
  config = tiny_config(tmp_path, total_steps=26, checkpoint_every_steps=100,
                       **{'loss_spike.window': 10, 'loss_spike.threshold': 6.0})
  train.train_and_evaluate(config, str(workdir))
  (spike,) = [r for r in read_timeline(workdir) if r['event'] == 'loss_spike']
  record = {r['step']: r for r in read_metrics(workdir)}[25]
  assert spike['step'] == 25 and spike['z_score'] > 6
  assert spike['loss'] == record['train/loss'] and spike['grad_norm'] == record['train/grad_norm']
  # Replaying: the position is where the iterator stood before step 25's batch.
  iterator = data.make_train_iterator(config, data.build_tokenizer(config.data, str(workdir)), 0, 1)
  for _ in range(24):
    next(iterator)
  assert spike['data_position'] == json.loads(json.dumps(iterator.get_state()))


def test_a_restart_counts_the_lost_steps_in_goodput(tmp_path, monkeypatch, capsys):
  train_step = steps.train_step

  def nan_at_step_13(state, frozen, batch, **kwargs):
    mask = jnp.where(state.step + 1 == 13, jnp.nan, jnp.ones(batch['targets'].shape))
    return train_step(state, frozen, {**batch, 'mask': mask}, **kwargs)

  workdir = tmp_path / 'run'
  config = tiny_config(tmp_path, total_steps=16, checkpoint_every_steps=10)
  monkeypatch.setattr(steps, 'train_step', nan_at_step_13)
  with pytest.raises(FloatingPointError):
    train.train_and_evaluate(config, str(workdir))  # Ends at 13; checkpoint 10 is the latest.
  first = json.loads((workdir / 'goodput.json').read_text())['run']
  # Step 13's loss is read while step 14 runs: that iteration finished no step.
  assert first['segments'] == 1 and first['last_productive_step'] == 13
  monkeypatch.undo()
  capsys.readouterr()
  train.train_and_evaluate(config, str(workdir))

  result = json.loads((workdir / 'goodput.json').read_text())
  run, segment = result['run'], result['segment']
  assert (run['segments'], run['disruptions'], run['last_productive_step']) == (2, 1, 16)
  assert segment['segments'] == 1 and segment['total_seconds'] < run['total_seconds']
  assert run['badput_seconds']['wasted_progress_from_disruption'] > 0  # Steps 11 to 13.
  assert run['badput_seconds']['unproductive_checkpoint_restore_time'] > 0
  for part in (run, segment):
    assert 0 < part['goodput_percent'] < 100
    accounted = part['productive_seconds'] + sum(part['badput_seconds'].values())
    assert accounted == pytest.approx(part['total_seconds'], abs=0.01)
  assert f"Goodput {run['goodput_percent']:.1f}% of" in capsys.readouterr().out


def stall_once(monkeypatch, call: int, seconds: float) -> None:
  """The `call`-th batch fetch of the loop sleeps (an injected stall)."""
  global_batch, calls = train.global_batch, []

  def stalled_global_batch(*args):
    calls.append(1)
    if len(calls) == call:
      time.sleep(seconds)
    return global_batch(*args)

  monkeypatch.setattr(train, 'global_batch', stalled_global_batch)


def test_watchdog_dumps_every_stack_on_a_stall_and_the_run_goes_on(tmp_path, monkeypatch):
  stall_once(monkeypatch, call=6, seconds=4.0)
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(tmp_path, total_steps=8, hang_timeout_s=1.0),
                           str(workdir))
  # A slow evaluation or save under load may be a stall too; the injected one is among them.
  (stacks,) = [text for dump in (workdir / 'hangs').glob('process_0_after_step_*.txt')
               if 'stalled_global_batch' in (text := dump.read_text())]
  assert 'train_and_evaluate' in stacks
  assert stacks.count('Thread 0x') >= 2  # Every thread: the loop's, the watchdog's, grain's.
  hangs = [r for r in read_timeline(workdir) if r['event'] == 'hang']
  assert hangs and all(r['seconds'] >= 1.0 for r in hangs)
  assert read_metrics(workdir)[-1]['step'] == 8


STALLED_RUN = '''
import sys, time
from lepton_jax import train
from tests.conftest import tiny_config
global_batch, calls = train.global_batch, []
def stalled_global_batch(*args):
  calls.append(1)
  if len(calls) == 4:
    time.sleep(600)
  return global_batch(*args)
train.global_batch = stalled_global_batch
tmp = sys.argv[1]
train.train_and_evaluate(tiny_config(__import__('pathlib').Path(tmp), total_steps=8,
                                     hang_timeout_s=2.0, hang_exit=True), tmp + '/run')
'''


def test_watchdog_exits_nonzero_when_told_to(tmp_path):
  started = time.time()
  result = subprocess.run([sys.executable, '-c', STALLED_RUN, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  output = result.stdout + result.stderr
  assert result.returncode == monitor.HANG_EXIT_CODE, output[-3000:]
  assert time.time() - started < 300
  assert 'No step has finished for' in output and 'stalled_global_batch' in output
  (dump,) = (tmp_path / 'run' / 'hangs').glob('*.txt')
  assert 'stalled_global_batch' in dump.read_text()


def test_wandb_offline_writes_a_run_directory(tmp_path, monkeypatch):
  pytest.importorskip('wandb')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  workdir = tmp_path / 'run'
  config = tiny_config(tmp_path, total_steps=3, **{'wandb.project': 'lepton-test',
                                                   'wandb.mode': 'offline'})
  train.train_and_evaluate(config, str(workdir))
  (run_file,) = (workdir / 'wandb').glob('offline-run-*/run-*.wandb')
  run_id = (workdir / 'wandb_run_id').read_text().strip()
  assert run_file.name == f'run-{run_id}.wandb'
  logged = run_file.read_bytes()
  assert b'train/loss' in logged and b'memory/host_rss_bytes' in logged


@pytest.mark.parametrize('overrides,message', [
    ({'profile.num_steps': -1}, r'config.profile: start_step=10 must be >= 1 and num_steps=-1'),
    ({'hang_timeout_s': -1.0}, r'config.hang_timeout_s=-1.0: must be >= 0'),
    ({'loss_spike.window': 2}, r'config.loss_spike: window=2 must be 0 \(off\) or >= 3'),
    ({'wandb.mode': 'cloud'}, r"config.wandb.mode='cloud': expected one of"),
])
def test_bad_monitoring_config_fails_with_a_clear_error(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(tmp_path, **overrides), str(tmp_path / 'run'))
