"""Training as 2 processes x 4 CPU devices on localhost: the losses of 1 process x 8 devices, one
SentencePiece model trained for both, and an exact resume when each process streams its own
documents.

Each process builds its half of every global batch (make_train_iterator's process share, checked
row by row in test_data.py) and JAX assembles them with make_array_from_process_local_data; only
process 0 writes metrics.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from tests.conftest import TEXT

REPO = pathlib.Path(__file__).parent.parent
# Params split over fsdp=4, across both processes; the batch over data x fsdp = all 8 devices.
FLAGS = ['--config=configs/stdlib_tiny.py', '--config.data.source=text',
         '--config.data.tokenizer=bytes', '--config.total_steps=4', '--config.log_every_steps=1',
         '--config.eval_every_steps=4', '--config.eval_batches=1', '--config.batch_size=8',
         '--config.seq_len=32', '--config.model.num_layers=1', '--config.model.d_model=32',
         '--config.model.num_heads=2', '--config.model.num_kv_heads=2',
         '--config.model.head_dim=16', '--config.model.d_ff=64', '--config.sample.num_tokens=0',
         '--config.mesh.data=2', '--config.mesh.fsdp=4']


def start_trainer(workdir, corpus, devices: int, *cluster_flags: str) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(devices))
  command = [sys.executable, '-m', 'lepton_jax.train', f'--workdir={workdir}', *FLAGS,
             f'--config.data.path={corpus}', *cluster_flags]
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def run_two_processes(workdir, corpus, *flags: str) -> None:
  port = portpicker.pick_unused_port()
  trainers = [start_trainer(workdir, corpus, 4, f'--coordinator_address=localhost:{port}',
                            '--num_processes=2', f'--process_id={i}', *flags) for i in range(2)]
  try:
    outputs = [trainer.communicate(timeout=240)[0] for trainer in trainers]
  finally:
    for trainer in trainers:
      trainer.kill()
  for i, trainer in enumerate(trainers):
    assert trainer.returncode == 0, f'process {i}:\n{outputs[i][-3000:]}'


def losses(workdir) -> list[float]:
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  return [r['train/loss'] for r in records] + [records[-1]['eval/loss']]


def test_two_processes_match_one_process_with_eight_devices(tmp_path):
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(TEXT)
  port = portpicker.pick_unused_port()
  spm = ['--config.data.tokenizer=sentencepiece', '--config.data.vocab_size=300']
  trainers = {
      'one process': start_trainer(tmp_path / 'single', corpus, 8, *spm),
      'process 0': start_trainer(tmp_path / 'multi', corpus, 4, *spm, f'--coordinator_address='
                                 f'localhost:{port}', '--num_processes=2', '--process_id=0'),
      'process 1': start_trainer(tmp_path / 'multi', corpus, 4, *spm, f'--coordinator_address='
                                 f'localhost:{port}', '--num_processes=2', '--process_id=1'),
  }
  try:
    outputs = {name: trainer.communicate(timeout=240)[0] for name, trainer in trainers.items()}
  finally:
    for trainer in trainers.values():
      trainer.kill()
  for name, trainer in trainers.items():
    assert trainer.returncode == 0, f'{name}:\n{outputs[name][-3000:]}'
  assert 'process 1 of 2, 4 local devices, 8 global devices' in outputs['process 1']
  # Process 0 trains the tokenizer into the shared workdir; process 1 waits and loads it.
  assert 'Trained SentencePiece' in outputs['process 0']
  assert 'Trained SentencePiece' not in outputs['process 1']
  np.testing.assert_allclose(losses(tmp_path / 'multi'), losses(tmp_path / 'single'), rtol=1e-5)
  # Process 0 logs every process's step time and data wait, so a straggler shows.
  last = [json.loads(line) for line in open(tmp_path / 'multi' / 'metrics.jsonl')][-1]
  for i in range(2):
    assert last[f'perf/step_seconds/process_{i}'] > 0
    assert 0 <= last[f'perf/data_wait_fraction/process_{i}'] <= 1
  assert 'perf/step_seconds/process_0' not in json.loads(
      open(tmp_path / 'single' / 'metrics.jsonl').readline())


# Two minutes on 2 cores; the default suite keeps the two-process run and one-process resumes.
@pytest.mark.slow
def test_two_processes_resume_their_own_streams_exactly(tmp_path):
  """Streaming gives each process different documents, so each must resume its own position."""
  corpus = tmp_path / 'docs'
  corpus.mkdir()
  for i in range(12):  # Documents of different lengths, so the processes' packers drift apart.
    (corpus / f'{i:02d}.txt').write_text(TEXT[:400 + 300 * i], encoding='utf-8')
  # A constant learning rate after warmup, so a 4-step run is the start of an 8-step one.
  flags = ['--config.data.streaming=True', '--config.data.shuffle_window=8',
           '--config.optimizer.schedule=wsd', '--config.optimizer.cooldown_steps=0',
           '--config.optimizer.warmup_steps=2']
  run_two_processes(tmp_path / 'straight', corpus, *flags, '--config.total_steps=8')
  run_two_processes(tmp_path / 'resumed', corpus, *flags)  # Stops at step 4, checkpointed.
  run_two_processes(tmp_path / 'resumed', corpus, *flags, '--config.total_steps=8')

  def train_losses(workdir):
    return {r['step']: r['train/loss'] for r in map(json.loads, open(workdir / 'metrics.jsonl'))}
  straight, resumed = train_losses(tmp_path / 'straight'), train_losses(tmp_path / 'resumed')
  assert sorted(resumed) == list(range(1, 9))
  assert [resumed[s] for s in range(5, 9)] == [straight[s] for s in range(5, 9)]
