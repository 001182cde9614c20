"""scripts/tpu/launch.py: the gcloud commands each subcommand prints with --dry_run."""
import importlib.util
import pathlib
import shlex
import subprocess
import sys

import pytest

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'tpu' / 'launch.py'
_SPEC = importlib.util.spec_from_file_location('launch', _SCRIPT)
launch = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(launch)

_TPU = ['--name=lm', '--zone=us-west4-a', '--project=my-proj']


def dry_run(capsys, *argv):
  """The commands main() prints, each split back into its arguments."""
  launch.main([*argv, *_TPU, '--dry_run'])
  return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def ssh_command(command):
  """The remote shell command of a `gcloud compute tpus tpu-vm ssh` invocation."""
  assert command[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'lm']
  assert '--zone=us-west4-a' in command and '--project=my-proj' in command
  [remote] = [arg.removeprefix('--command=') for arg in command if arg.startswith('--command=')]
  return remote


def test_create_tpu_vm_with_default_runtime_and_spot(capsys):
  [command] = dry_run(capsys, 'create', '--accelerator_type=v5litepod-16', '--spot')
  assert command == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'lm',
                     '--zone=us-west4-a', '--accelerator-type=v5litepod-16',
                     '--version=v2-alpha-tpuv5-lite', '--spot', '--project=my-proj']


def test_create_queued_resource_with_explicit_runtime(capsys):
  [command] = dry_run(capsys, 'create', '--accelerator-type=v4-32', '--queued',
                      '--runtime_version=tpu-ubuntu2204-base')
  assert command == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'lm',
                     '--node-id=lm', '--zone=us-west4-a', '--accelerator-type=v4-32',
                     '--runtime-version=tpu-ubuntu2204-base', '--project=my-proj']


def test_create_preemptible(capsys):
  [command] = dry_run(capsys, 'create', '--accelerator_type=v4-8', '--preemptible')
  assert '--preemptible' in command and '--spot' not in command


def test_setup_ships_head_to_every_worker_and_installs_jax_tpu(capsys):
  archive, scp, install = dry_run(capsys, 'setup')
  assert archive[:2] == ['git', '-C'] and archive[3:5] == ['archive', '--format=tar.gz']
  assert archive[-1] == 'HEAD'
  local_archive = archive[-2].removeprefix('--output=')
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert scp[5:7] == [local_archive, 'lm:lepton_jax_code.tar.gz'] and '--worker=all' in scp
  assert '--worker=all' in install
  remote = ssh_command(install)
  assert 'tar -xzf "$HOME/lepton_jax_code.tar.gz"' in remote
  assert '--editable "$HOME/lepton_jax[tpu]"' in remote


def test_setup_can_clone_a_repo_instead(capsys):
  [install] = dry_run(capsys, 'setup', '--repo=https://example.com/lepton_jax.git',
                      '--branch=v0.1')
  remote = ssh_command(install)
  assert 'git clone --depth=1 --branch=v0.1 https://example.com/lepton_jax.git' in remote
  assert '--editable "$HOME/lepton_jax[tpu]"' in remote


def test_run_starts_the_same_quoted_train_command_on_every_worker(capsys):
  [command] = dry_run(capsys, 'run', '--config=configs/stdlib_tiny.py:big',
                      '--workdir=gs://bucket/runs/lm', '--config.total_steps=20000',
                      "--config.sample.prompt=def f(x): return 'hi'")
  assert '--worker=all' in command
  remote = ssh_command(command)
  assert remote.startswith('cd "$HOME/lepton_jax" || exit 1; nohup ')
  assert remote.endswith('> "$HOME/lepton_train.log" 2>&1 < /dev/null & '
                         'echo $! > "$HOME/lepton_train.pid"')
  # What the remote shell hands to Python once it has parsed the quoting.
  train = shlex.split(remote.split('nohup ', 1)[1].split(' > ', 1)[0])
  assert train == ['$HOME/lepton_venv/bin/python', '-m', 'lepton_jax.train',
                   '--config=configs/stdlib_tiny.py:big', '--workdir=gs://bucket/runs/lm',
                   '--config.total_steps=20000', "--config.sample.prompt=def f(x): return 'hi'"]


def test_logs_follows_one_worker(capsys):
  [command] = dry_run(capsys, 'logs', '--worker=3')
  assert '--worker=3' in command
  assert ssh_command(command) == 'tail -n 200 -F "$HOME/lepton_train.log"'
  [command] = dry_run(capsys, 'logs')
  assert '--worker=0' in command


def test_stop_sends_sigterm_on_every_worker(capsys):
  [command] = dry_run(capsys, 'stop')
  assert '--worker=all' in command
  assert 'kill -TERM "$(cat "$HOME/lepton_train.pid")"' in ssh_command(command)


def test_delete(capsys):
  [command] = dry_run(capsys, 'delete')
  assert command == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'lm',
                     '--zone=us-west4-a', '--quiet', '--project=my-proj']
  [command] = dry_run(capsys, 'delete', '--queued')
  assert command[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'lm']
  assert '--force' in command


@pytest.mark.parametrize('argv, message', [
    (['run', '--name=lm', '--zone=z', '--workdir=gs://b/r'], 'required: --config'),
    (['create', '--zone=z', '--accelerator_type=v4-8'], 'required: --name'),
    (['run', '--name=lm', '--zone=z', '--config=c.py', '--workdir=/tmp/r'],
     '--workdir must be gs://'),
    (['stop', '--name=lm', '--zone=z', '--config.total_steps=1'], 'unrecognized arguments'),
    (['create', '--name=lm', '--zone=z', '--accelerator_type=v4-8', '--spot', '--preemptible'],
     'not allowed with argument'),
    (['create', '--name=lm', '--zone=z', '--accelerator_type=v4-8', '--queued', '--preemptible'],
     'queued resources take --spot'),
])
def test_bad_arguments_fail_with_a_clear_message(capsys, argv, message):
  with pytest.raises(SystemExit):
    launch.main([*argv, '--dry_run'])
  assert message in capsys.readouterr().err


def test_unknown_generation_asks_for_a_runtime():
  with pytest.raises(SystemExit, match='pass --runtime_version'):
    launch.main(['create', '--accelerator_type=v9x-8', *_TPU, '--dry_run'])


def test_command_line_entry_point():
  result = subprocess.run(
      [sys.executable, str(_SCRIPT), 'delete', *_TPU, '--dry_run'],
      capture_output=True, text=True, check=True, timeout=60)
  assert result.stdout.strip() == (
      'gcloud compute tpus tpu-vm delete lm --zone=us-west4-a --quiet --project=my-proj')
