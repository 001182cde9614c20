"""scripts/benchmark_serve.py end to end on a tiny model: every setting reports throughput and
latency percentiles, and the plot is written."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip('aiohttp')
pytest.importorskip('fastapi')

TINY = ['--config=configs/stdlib_tiny.py', '--config.model.vocab_size=512',
        '--config.model.d_model=32', '--config.model.num_layers=1', '--config.model.num_heads=2',
        '--config.model.num_kv_heads=1', '--config.model.head_dim=16', '--config.model.d_ff=64',
        '--config.model.max_seq_len=16']  # One prefill bucket.


def test_serve_benchmark_reports_every_setting(tmp_path):
  plot = tmp_path / 'serve.png'
  result = subprocess.run(
      [sys.executable, 'scripts/benchmark_serve.py', *TINY, '--max_batch=2',
       '--concurrency=1,2', '--rates=50', '--num_requests=4', '--prompt_len=4:10',
       '--output_len=3:6', f'--plot={plot}'],
      capture_output=True, text=True, timeout=300, env=dict(os.environ, XLA_FLAGS=''))
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
  assert [r['setting'] for r in rows] == ['c=1', 'c=2', 'rate=50']
  for row in rows:
    assert row['requests'] == 4 and row['output_tokens_per_s'] > 0
    assert row['ttft_ms']['p50'] <= row['ttft_ms']['p99']
    assert set(row['tpot_ms']) == set(row['itl_ms']) == {'p50', 'p90', 'p99'}
  assert "one client's output tokens/s" in result.stdout and plot.stat().st_size > 1000
