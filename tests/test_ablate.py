"""scripts/ablate.py: a 2x2 grid of short runs, its table and plots, resuming, failing cells, and
the sweep files of the published ablations."""
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from lepton_jax import config_lib
from lepton_jax.ablation import grid, report, runner
from tests.conftest import tiny_config

REPO = pathlib.Path(__file__).parent.parent
# The studies docs/ablations.md reproduces, each a sweep file that names its paper.
PUBLISHED = ('gated_mlp', 'positions', 'norms', 'schedules', 'lr_stability', 'decontamination')


def ablate(*args):
  # The runs share the test processes' compilation cache: the four cells compile alike.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(
      tempfile.gettempdir(), 'lepton_jax_test_xla_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return subprocess.run([sys.executable, 'scripts/ablate.py', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
  """A 2x2 sweep run once: mlp x data, where the 'missing' data makes both its runs fail."""
  tmp_path = tmp_path_factory.mktemp('ablate')
  config = tiny_config(tmp_path, total_steps=4, eval_every_steps=2, checkpoint_every_steps=2)
  config_file = tmp_path / 'tiny.py'
  config_file.write_text('import ml_collections\n\n\ndef get_config():\n'
                         f'  return ml_collections.ConfigDict({config.to_dict()!r})\n')
  sweep_file = tmp_path / 'data_sweep.py'
  sweep_file.write_text(f"""def get_sweep():
  return dict(axes={{'data': {{'text': {{'data.path': {config.data.path!r}}},
                               'missing': {{'data.path': {str(tmp_path / 'nowhere.txt')!r}}}}}}})
""")
  args = [f'--config={config_file}', f'--workdir={tmp_path / "runs"}',
          "--sweep=model.mlp=swiglu,gelu", f'--sweep={sweep_file}', '--config.seed=7']
  return args, tmp_path / 'runs', ablate(*args)


def test_grid_runs_and_reports(sweep):
  _, workdir, result = sweep
  assert result.returncode == 0, result.stderr
  progress = [line for line in result.stdout.splitlines() if line.startswith('[')]
  assert progress[:2] == [line for line in progress if ': ok in' in line]
  assert len(progress) == 4 and all(': failed in' in line and 'nowhere.txt' in line
                                    for line in progress[2:])
  results = [json.loads(line) for line in (workdir / 'results.jsonl').read_text().splitlines()]
  assert [r['name'] for r in results] == [
      'data=text,mlp=swiglu,seed=7', 'data=text,mlp=gelu,seed=7',
      'data=missing,mlp=swiglu,seed=7', 'data=missing,mlp=gelu,seed=7']
  ok = {r['labels']['mlp']: r for r in results if r['status'] == 'ok'}
  logged = [json.loads(l) for l in (workdir / 'data=text,mlp=gelu,seed=7' / 'metrics.jsonl')
            .read_text().splitlines()]
  assert ok['gelu']['final']['eval/bits_per_byte'] == logged[-1]['eval/bits_per_byte']
  assert ok['gelu']['curves']['eval/bits_per_byte'] == [[2, logged[1]['eval/bits_per_byte']],
                                                        [4, logged[3]['eval/bits_per_byte']]]
  assert ok['gelu']['overrides'] == {'model.mlp': 'gelu', 'data.path': ok['gelu']['overrides'][
      'data.path'], 'seed': 7}
  # Parameters of the tiny model by hand: embed and head 257 x 32, per layer q 32 x 32, k and v
  # 32 x 16, o 32 x 32, the MLP 2 (gelu) or 3 (swiglu) x 32 x 64 matrices, two norms of 32.
  attention, norms = 32 * 32 * 2 + 32 * 16 * 2, 2 * 32
  for mlp, matrices in (('gelu', 2), ('swiglu', 3)):
    params = 2 * 257 * 32 + 32 + 2 * (attention + matrices * 32 * 64 + norms)
    assert ok[mlp]['params'] == params
    footprint = ok[mlp]['footprint']  # Every weight trains; AdamW's two f32 moments, and counts.
    assert footprint['trainable'] == params
    assert 8 * params < footprint['optimizer_bytes'] <= 8 * params + 16
    assert footprint['checkpoint_bytes'] > 4 * params

  table = (workdir / 'table.md').read_text()
  assert table in result.stdout
  header, _, *rows = table.split('\n\n')[0].splitlines()
  assert header.split(' | ')[:4] == ['| data', 'mlp', 'eval/bits_per_byte', 'Δ vs data=text']
  cells = [[c.strip() for c in row.strip('|').split('|')] for row in rows]
  swiglu, gelu = (float(c[2]) for c in cells[:2])
  assert float(cells[1][4]) == pytest.approx(gelu - swiglu, abs=1.01e-4)  # Of unrounded means.
  assert cells[0][4] == '(baseline)'
  assert cells[2][2:4] == ['—', '—'] and cells[2][-1] == '0 ok, 1 failed'
  assert 'Failed runs:' in table and "nowhere.txt' matches no file" in table
  for plot in ('curves.png', 'final.png', 'budget.png'):
    assert (workdir / plot).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_a_rerun_skips_finished_runs_and_resumes_the_interrupted(sweep):
  args, workdir, _ = sweep
  interrupted = workdir / 'data=text,mlp=gelu,seed=7'
  (interrupted / 'result.json').unlink()  # As if killed after its last checkpoint.
  result = ablate(*args)
  assert result.returncode == 0, result.stderr
  progress = [line for line in result.stdout.splitlines() if line.startswith('[')]
  assert progress[0] == '[1/4] data=text,mlp=swiglu,seed=7: complete, skipped'
  assert progress[1].startswith('[2/4] data=text,mlp=gelu,seed=7: ok in')
  assert 'Resuming from the checkpoint at step 4' in (interrupted / 'train.log').read_text()
  assert all(': failed in' in line for line in progress[2:])  # Failed runs are tried again.


def test_shards_split_the_grid_and_collect_reads_them_all(sweep, tmp_path):
  args, workdir, _ = sweep
  result = ablate(*args, '--collect')
  assert result.returncode == 0 and not [l for l in result.stdout.splitlines() if l.startswith('[')]
  cells = [grid.Cell((('a', str(i)),), 0, {}) for i in range(5)]
  assert [c.name for c in grid.shard(cells, '1/2')] == ['a=1,seed=0', 'a=3,seed=0']
  with pytest.raises(ValueError, match=r"--shard='2/2': expected i/n with 0 <= i < n"):
    grid.shard(cells, '2/2')


def test_pending_cells_are_marked_in_the_table():
  cells = [grid.Cell((('lr', lr),), seed, {}) for lr in ('1', '2') for seed in (0, 1)]
  footprint = {'trainable': 10, 'optimizer_bytes': 80_000, 'checkpoint_bytes': 20_000}
  results = {'lr=1,seed=0': {'name': 'lr=1,seed=0', 'status': 'ok', 'final': {'m': 1.0},
                             'params': 10, 'tokens_per_sec': 5.0, 'footprint': footprint},
             'lr=1,seed=1': {'name': 'lr=1,seed=1', 'status': 'ok', 'final': {'m': 2.0},
                             'params': 10, 'tokens_per_sec': 7.0},
             'lr=2,seed=0': {'name': 'lr=2,seed=0', 'status': 'ok', 'final': {'m': 4.0},
                             'params': 10, 'tokens_per_sec': 6.0}}
  axes = {'lr': {'1': {}, '2': {}}}
  table = report.table(axes, report.summarize(cells, results, 'm'), results, 'm')
  rows = table.splitlines()[2:]
  assert rows[0] == (f'| 1 | 1.5000 ± {np.std([1, 2], ddof=1):.4f} | (baseline) | 10 | 10 | '
                     '0.08 MB | 0.02 MB | 6 | 2 ok |')
  assert rows[1] == '| 2 | 4.0000 | +2.5000 | 10 | — | — | — | 6 | 1 ok, 1 pending |'


def test_final_plot_draws_the_first_axis_with_a_line_per_label_of_the_others():
  axes = {'lr': {'1e-3': {}, '1e-2': {}}, 'norm': {'none': {}, 'qk': {}}}
  cells = [grid.Cell((('lr', lr), ('norm', norm)), seed, {})
           for norm in axes['norm'] for lr in axes['lr'] for seed in (0, 1)]
  # Results out of grid order, and one cell with no finished run.
  values = {('1e-2', 'none'): (3.0, 5.0), ('1e-3', 'none'): (1.0, 1.0), ('1e-2', 'qk'): (2.0,)}
  results = {f'lr={lr},norm={norm},seed={seed}': {'status': 'ok', 'final': {'m': v}, 'params': 1}
             for (lr, norm), vs in values.items() for seed, v in enumerate(vs)}
  series = report.final_series(axes, report.summarize(cells, results, 'm'))
  assert series == {'none': [(0, 1.0, 0.0), (1, 4.0, np.std([3, 5], ddof=1))],
                    'qk': [(1, 2.0, None)]}


@pytest.mark.parametrize('flag,message', [
    ('model.mlpx=a,b', r'config.model.mlpx=.a. names no field'),
    ('model.mlp=swiglu,gelux', r"config.model.mlp='gelux': expected one of"),
    ('model.d_ff=512,wide', r"config.model.d_ff='wide' has the wrong type"),
    ('model.mlp', r'expected KEY=VALUE,VALUE,... or a sweep file'),
])
def test_bad_sweeps_fail_before_any_run(flag, message):
  base = tiny_config()
  with pytest.raises(ValueError, match=message):
    grid.cells(grid.combine([flag]).axes, base, seeds=1)


@pytest.mark.parametrize('name', PUBLISHED)
def test_published_sweep_files_expand_to_valid_runs(name):
  sweep = grid.load_sweep_file(str(REPO / 'configs' / 'sweeps' / f'{name}.py'))
  base = config_lib.load_file(str(REPO / sweep.config))
  cells = grid.cells(sweep.axes, base, sweep.seeds)
  assert sweep.seeds >= 3 and len({c.name for c in cells}) == len(cells)
  if name == 'gated_mlp':  # Equal MLP parameters: 3 x gated d_ff == 2 x ungated d_ff.
    widths = {c.overrides['model.mlp']: c.overrides['model.d_ff'] for c in cells}
    assert 3 * widths['swiglu'] == 3 * widths['geglu'] == 2 * widths['gelu'] == 2 * widths['relu']
  if name == 'decontamination':  # Both cells scored on the whole validation split too.
    assert base.evals.val_full.type == 'lm' and base.evals.val_full.every == base.total_steps
    assert {c.overrides['data.filters.steps'] for c in cells} == {(), ('decontaminate',)}


def test_runs_from_trained_weights_keep_their_sources_tokenizer(tmp_path):
  config = tiny_config(**{'data.tokenizer': 'sentencepiece', 'data.source': 'stdlib'})
  cells = grid.cells({'lr': {'a': {'optimizer.learning_rate': 1e-3}}}, config, 1)
  config.init_from = 'workdir:/some/base'
  assert runner.shared_tokenizer(config, cells, str(tmp_path)) == {}
  assert not (tmp_path / 'tokenizer').exists()  # Nothing trained: the base's tokenizer is used.


def test_the_lora_sweep_runs_the_methods_its_argument_names():
  sweep_file = REPO / 'configs' / 'sweeps' / 'lora.py'
  every = grid.load_sweep_file(f'{sweep_file}:/runs/base')
  assert every.config == 'configs/lora_adapt.py:/runs/base' and len(every.axes['method']) == 15
  some = grid.load_sweep_file(f'{sweep_file}:/runs/base:full,all_r8_dora')
  assert list(some.axes['method']) == ['full', 'all_r8_dora']
  assert some.axes['method']['all_r8_dora']['lora.dora'] is True
  with pytest.raises(ValueError, match=r"no method \['all_r9'\]"):
    grid.load_sweep_file(f'{sweep_file}:/runs/base:all_r9')
