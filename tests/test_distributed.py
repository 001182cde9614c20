"""Multi-host start-up: the mode decision under each launcher's environment, and a real
2-process CPU job on localhost that reduces one array across both processes."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from tests.conftest import TEXT, read_metrics
from lepton_jax import config_lib, distributed, flops

REPO = pathlib.Path(__file__).parent.parent

# Variables the mode decision reads; the test machine may itself run under one of these.
_CLUSTER_VARS = (
    'SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID',
    'OMPI_MCA_orte_hnp_uri', 'OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_RANK',
    'OMPI_COMM_WORLD_LOCAL_RANK', 'TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES',
    'MEGASCALE_COORDINATOR_ADDRESS')
_SLURM_STEP = dict(SLURM_JOB_ID='4242', SLURM_STEP_NODELIST='node[001-004]', SLURM_NTASKS='4',
                   SLURM_PROCID='1', SLURM_LOCALID='0')
_OPENMPI_JOB = dict(OMPI_MCA_orte_hnp_uri='1234.0;tcp://10.0.0.1:5678', OMPI_COMM_WORLD_SIZE='2',
                    OMPI_COMM_WORLD_RANK='1', OMPI_COMM_WORLD_LOCAL_RANK='0')


@pytest.fixture(autouse=True)
def clean_cluster_env(monkeypatch):
  """No launcher variables, no metadata server."""
  for var in _CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(distributed, '_gce_metadata', lambda attribute: None)


@pytest.fixture
def init_calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of joining a cluster."""
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, 'initialize',
                      lambda *args, **kwargs: calls.append((args, kwargs)))
  return calls


def _mode(environ, address=None, num_processes=None, process_id=None):
  return distributed.detect_mode(address, num_processes, process_id, environ)


def test_no_flags_and_no_cluster_is_single_process(init_calls):
  assert distributed.initialize() == 'single'
  assert init_calls == []
  assert distributed.is_coordinator()


def test_flags_join_the_given_coordinator(init_calls):
  assert distributed.initialize('10.0.0.2:1234', num_processes=4, process_id=3) == 'flags'
  assert init_calls == [(('10.0.0.2:1234', 4, 3), {})]


def test_flags_win_over_a_detected_cluster():
  assert _mode(_SLURM_STEP, '10.0.0.2:1234', 2, 0) == 'flags'


def test_process_zero_counts_as_given():
  assert _mode({}, 'localhost:1', 1, 0) == 'flags'


@pytest.mark.parametrize('given, missing', [
    (dict(address='10.0.0.2:1234'), '--num_processes, --process_id missing'),
    (dict(address='10.0.0.2:1234', num_processes=2), '--process_id missing'),
    (dict(num_processes=2, process_id=0), '--coordinator_address missing'),
])
def test_partial_flags_name_what_is_missing(given, missing):
  with pytest.raises(ValueError, match=missing):
    _mode({}, **given)


@pytest.mark.parametrize('environ, mode', [
    (_SLURM_STEP, 'slurm'),
    (dict(_SLURM_STEP, SLURM_NTASKS='1'), 'single'),
    (_OPENMPI_JOB, 'openmpi'),
    (dict(_OPENMPI_JOB, OMPI_COMM_WORLD_SIZE='1'), 'single'),
    (dict(TPU_WORKER_HOSTNAMES='t-0,t-1,t-2,t-3'), 'cloud_tpu'),
    (dict(TPU_PROCESS_ADDRESSES='10.0.0.1:8476,10.0.0.2:8476'), 'cloud_tpu'),
    (dict(TPU_WORKER_HOSTNAMES='t-0'), 'single'),
    (dict(MEGASCALE_COORDINATOR_ADDRESS='t-0', TPU_WORKER_HOSTNAMES='t-0'), 'cloud_tpu'),
])
def test_cluster_detection_from_the_environment(environ, mode):
  assert _mode(environ) == mode


@pytest.mark.parametrize('endpoints, mode', [
    ('10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4', 'cloud_tpu'),  # New format: hostnames.
    ('w-0:0:10.0.0.1,w-1:1:10.0.0.2', 'cloud_tpu'),  # Old format: name:id:ip.
    ('10.0.0.1', 'single'),  # A single-host slice.
])
def test_tpu_vm_hosts_come_from_gce_metadata(monkeypatch, endpoints, mode):
  metadata = {'worker-network-endpoints': endpoints}
  monkeypatch.setattr(distributed, '_gce_metadata', metadata.get)
  assert _mode({}) == mode


def test_slurm_batch_script_without_srun_is_refused():
  step = dict(_SLURM_STEP)
  del step['SLURM_STEP_NODELIST']
  with pytest.raises(ValueError, match='SLURM_STEP_NODELIST unset: start each process with srun'):
    _mode(step)


@pytest.mark.parametrize('environ', [_SLURM_STEP, _OPENMPI_JOB,
                                     dict(TPU_WORKER_HOSTNAMES='t-0,t-1')])
def test_detected_cluster_lets_jax_read_the_environment(monkeypatch, init_calls, environ):
  for var, value in environ.items():
    monkeypatch.setenv(var, value)
  assert distributed.initialize() != 'single'
  assert init_calls == [((), {})]


# One process of the localhost job: joins through the flags, reduces a global 8-element array
# whose halves live on different processes, and prints what it saw as JSON.
_WORKER = """
import json, sys
from absl import flags
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from lepton_jax import cli, distributed

cli.define_flags()
flags.FLAGS(sys.argv)
mode = cli.initialize_distributed()
mesh = jax.make_mesh((jax.device_count(),), ('data',))
local_x = np.arange(4, dtype=np.float32) + 4 * jax.process_index()
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), local_x)
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
print(json.dumps(dict(
    mode=mode, process_index=jax.process_index(), process_count=jax.process_count(),
    local_devices=jax.local_device_count(), devices=jax.device_count(),
    coordinator=distributed.is_coordinator(), total=float(total))))
"""


def test_two_processes_on_localhost_reduce_one_global_array():
  port = portpicker.pick_unused_port()
  env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_VARS + ('XLA_FLAGS',)}
  env.update(JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='4')
  workers = [
      subprocess.Popen(
          [sys.executable, '-c', _WORKER, f'--coordinator_address=localhost:{port}',
           '--num_processes=2', f'--process_id={i}'],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    outputs = [worker.communicate(timeout=120) for worker in workers]
  finally:
    for worker in workers:
      worker.kill()
  for worker, (_, stderr) in zip(workers, outputs):
    assert worker.returncode == 0, stderr[-3000:]
  reports = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
  for i, report in enumerate(reports):
    assert report == dict(mode='flags', process_index=i, process_count=2, local_devices=4,
                          devices=8, coordinator=(i == 0), total=float(sum(range(8))))


def test_cpu_devices_flag_splits_the_host():
  code = ('import sys; from absl import flags; import jax; from lepton_jax import cli; '
          'cli.define_flags(); flags.FLAGS(sys.argv); cli.initialize_distributed(); '
          'print(jax.device_count())')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run([sys.executable, '-c', code, '--cpu_devices=3'], env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ['3']


def _config(path: str, **overrides):
  return config_lib.override(config_lib.load_file(str(REPO / path)), overrides)


@pytest.mark.parametrize('overrides,cores,expected', [
    ({}, 2, 2),  # shakespeare_char: ~4 GFLOP a step.
    ({}, 1, 1),
    ({'batch_size': 13}, 2, 1),  # The batch does not split over the cores.
    ({'grad_accum_steps': 4}, 2, 1),  # 12 rows do not make 4 micro-batches on each of 2 devices.
    ({'mesh.tensor': 2}, 2, 1),  # A mesh of the user's own.
    ({'model.d_ff': 65536}, 2, 1),  # ~300 GFLOP a step: its matmuls already fill the cores.
])
def test_default_cpu_devices_split_small_models_only(overrides, cores, expected):
  config = _config('configs/shakespeare_char.py', **overrides)
  assert flops.default_cpu_devices(config, cores) == expected


def test_the_default_cpu_device_count_trains_the_losses_of_one_device_and_caches(tmp_path):
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(TEXT)
  flags_ = ['--config=configs/shakespeare_char.py', f'--config.data.path={corpus}',
            '--config.model.num_layers=1', '--config.total_steps=4', '--config.log_every_steps=1',
            '--config.sample.num_tokens=0']
  # Neither the suite's device count nor its cache: the run's own choices are under test.
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'JAX_COMPILATION_CACHE_DIR')}
  logs, losses = {}, {}
  cache = tmp_path / 'xla_cache'
  for name, extra in (('default', [f'--compilation_cache_dir={cache}']),
                      ('one', ['--cpu_devices=1', '--compilation_cache_dir='])):
    result = subprocess.run([sys.executable, '-m', 'lepton_jax.train', *flags_, *extra,
                             f'--workdir={tmp_path / name}'], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logs[name] = result.stderr
    losses[name] = [r['train/loss'] for r in read_metrics(tmp_path / name) if 'train/loss' in r]
  chosen = flops.default_cpu_devices(_config('configs/shakespeare_char.py',
                                             **{'model.num_layers': 1}),
                                     len(os.sched_getaffinity(0)))
  assert f'{chosen} local devices' in logs['default'] and '1 local devices' in logs['one']
  assert len(losses['default']) == 4
  assert any(cache.iterdir())  # The compiled train step, for the next run.
  np.testing.assert_allclose(losses['default'], losses['one'], rtol=1e-5, atol=1e-5)
