"""metrics.jsonl on a local disk and on gs://, fresh and resumed."""
import json

from etils import epath
import pytest

from lepton_jax import metrics


def steps_in(path) -> list[int]:
  return [json.loads(line)['step'] for line in epath.Path(path).read_text().splitlines()]


@pytest.mark.parametrize('where', ['local', 'gs'])
def test_records_accumulate_and_a_resume_drops_the_steps_it_repeats(tmp_path, fake_gcs, where):
  path = tmp_path / 'metrics.jsonl' if where == 'local' else 'gs://bucket/run/metrics.jsonl'
  if where == 'gs':
    epath.Path('gs://bucket/run').mkdir(parents=True)
  log = metrics.JsonLines(path, first_step=0)
  for step in (10, 20, 30):
    log.append({'step': step, 'train/loss': 1.0 / step})
  assert steps_in(path) == [10, 20, 30]

  # A run resumed from its checkpoint at step 20 logs step 30 again: one record per step.
  log = metrics.JsonLines(path, first_step=20)
  assert steps_in(path) == [10, 20]
  log.append({'step': 30, 'train/loss': 0.5})
  assert steps_in(path) == [10, 20, 30]
  assert json.loads(epath.Path(path).read_text().splitlines()[-1])['train/loss'] == 0.5


def test_a_line_cut_short_by_a_crash_is_dropped(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')
  metrics.JsonLines(path, first_step=5).append({'step': 6})
  assert steps_in(path) == [1, 6]


@pytest.mark.parametrize('where', ['local', 'gs'])
def test_a_timeline_keeps_every_segment_and_reads_back(tmp_path, fake_gcs, where):
  path = tmp_path / 'timeline.jsonl' if where == 'local' else 'gs://bucket/run/timeline.jsonl'
  if where == 'gs':
    epath.Path('gs://bucket/run').mkdir(parents=True)
  metrics.JsonLines(path, first_step=None).append({'step': 30, 'event': 'steps'})
  timeline = metrics.JsonLines(path, first_step=None)  # A segment resumed at step 20.
  timeline.append({'step': 20, 'event': 'start'})
  assert steps_in(path) == [30, 20]
  assert timeline.read() == [{'step': 30, 'event': 'steps'}, {'step': 20, 'event': 'start'}]
