"""The benchmark scripts: train step (or its parts) on a CPU mesh, and the input pipeline."""
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).parent.parent
TINY = ['--config=configs/stdlib_tiny.py', '--config.model.vocab_size=272',
        '--config.model.num_layers=1', '--config.batch_size=4', '--config.seq_len=16']


# 'step' runs the forward and backward passes the other parts time alone.
@pytest.mark.parametrize('part', ['step', pytest.param('fwd_bwd', marks=pytest.mark.slow),
                                  pytest.param('fwd', marks=pytest.mark.slow)])
def test_benchmark_reports_each_part_on_two_devices(part):
  result = subprocess.run(
      [sys.executable, 'scripts/benchmark_train.py', *TINY, '--cpu_devices=2', '--steps=2',
       '--repeats=2', f'--part={part}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['part'] == part and report['num_devices'] == 2
  assert report['tokens_per_sec'] == pytest.approx(4 * 16 / (report['ms_per_step'] / 1000),
                                                   rel=1e-2)
  # MFU counts a whole train step's FLOPs, so only a whole step reports it.
  assert (report['mfu'] is not None) == (part == 'step')


def test_loop_benchmark_reports_the_loops_overhead_over_the_isolated_step(tmp_path):
  result = subprocess.run(
      [sys.executable, 'scripts/benchmark_train.py', '--config=configs/shakespeare_char.py',
       f'--config.data.path={REPO / "README.md"}', '--config.model.num_layers=1',
       '--cpu_devices=2', '--part=loop', '--steps=4', '--repeats=1', f'--workdir={tmp_path}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['num_devices'] == 2 and list(report['ms_per_step']) == ['off']
  assert report['isolated_step_ms'] > 0
  assert report['loop_overhead'] == pytest.approx(
      report['ms_per_step']['off'] / report['isolated_step_ms'] - 1, abs=1e-3)


@pytest.mark.parametrize('streaming', [False, True])
def test_data_benchmark_reports_tokens_per_second(tmp_path, streaming):
  result = subprocess.run(
      [sys.executable, 'scripts/benchmark_data.py', '--config=configs/shakespeare_char.py',
       f'--config.data.path={REPO / "README.md"}', f'--config.data.streaming={streaming}',
       '--process_count=2', '--batches=5', f'--workdir={tmp_path}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['streaming'] is streaming
  assert (report['local_batch_size'], report['seq_len']) == (6, 64)  # Half of 12 x 64.
  assert report['tokens_per_sec'] == pytest.approx(
      report['batches_per_sec'] * 6 * 64, rel=1e-2)


def test_decode_benchmark_reports_rates_bandwidth_and_transformers():
  pytest.importorskip('transformers')
  result = subprocess.run(
      [sys.executable, 'scripts/benchmark_decode.py', *TINY, '--cpu_devices=2', '--batch=2',
       '--prompt_len=8', '--new_tokens=5', '--rounds=2', '--compare=transformers'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  *rounds, summary = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert [r['round'] for r in rounds] == [0, 1] and summary['num_devices'] == 2
  for r in rounds:  # 2 rows, 4 decode steps after the prefill.
    for impl in ('lepton_jax', 'transformers'):
      assert r[impl]['decode_tokens_per_sec'] == pytest.approx(
          2 / (r[impl]['ms_per_decode_step'] / 1000), rel=1e-2)
  assert summary['same_greedy_tokens'] and summary['speedup'] > 0
  lepton = summary['lepton_jax']
  assert 0 < lepton['bandwidth_utilisation'] == pytest.approx(
      lepton['decode_bytes_per_sec_per_device'] / lepton['memory_bandwidth_per_device'],
      rel=1e-2)


def test_decode_benchmark_sets_int8_variants_beside_float():
  result = subprocess.run(
      [sys.executable, 'scripts/benchmark_decode.py', *TINY, '--cpu_devices=2', '--batch=2',
       '--prompt_len=8',
       '--new_tokens=5', '--rounds=2', '--variants=f32,w8a8_kv8'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  *rounds, summary = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert all({'f32', 'w8a8_kv8'} <= r.keys() for r in rounds)
  f32, int8 = summary['f32'], summary['w8a8_kv8']
  assert (int8['quant']['weights'], int8['quant']['kv_cache']) == ('int8', 'int8')
  # f32 keys and values: 4 bytes a value; int8: 1, plus a 4-byte scale per head (stdlib_tiny's
  # head_dim is 32).
  head_dim = 32
  assert int8['cache_bytes_per_token'] == pytest.approx(
      f32['cache_bytes_per_token'] * (1 + 4 / head_dim) / 4)
  # Everything but the float head (this tiny model's largest matmul) shrinks to about a quarter.
  assert int8['bytes_per_decode_step'] < 0.5 * f32['bytes_per_decode_step']
  assert int8['speedup_over_f32'] > 0
