"""Create a Cloud TPU slice, install lepton_jax on every host, run training there, clean up.

Every host of a slice runs the same command; JAX finds the other hosts by itself
(lepton_jax/distributed.py). Each subcommand prints the gcloud commands it would run with --dry_run.

  python scripts/tpu/launch.py create --name=lm --zone=us-west4-a --accelerator_type=v5litepod-16 --spot
  python scripts/tpu/launch.py setup  --name=lm --zone=us-west4-a
  python scripts/tpu/launch.py run    --name=lm --zone=us-west4-a --config=configs/NAME.py \\
      --workdir=gs://BUCKET/runs/lm --config.total_steps=20000
  python scripts/tpu/launch.py logs   --name=lm --zone=us-west4-a [--worker=2]
  python scripts/tpu/launch.py stop   --name=lm --zone=us-west4-a
  python scripts/tpu/launch.py delete --name=lm --zone=us-west4-a
"""
import argparse
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# Where things live on each TPU host; double quotes so the remote shell still expands $HOME.
REMOTE_CODE = '"$HOME/lepton_jax"'
REMOTE_VENV = '"$HOME/lepton_venv"'
REMOTE_LOG = '"$HOME/lepton_train.log"'
REMOTE_PID = '"$HOME/lepton_train.pid"'
CODE_ARCHIVE = 'lepton_jax_code.tar.gz'
# TPU VM images ship an older Python than lepton_jax needs; uv installs this one beside it.
PYTHON_VERSION = '3.12'
UV_INSTALLER = 'https://astral.sh/uv/install.sh'

# The runtime (VM image) each TPU generation boots by default; --runtime_version overrides.
DEFAULT_RUNTIMES = {
    'v4': 'tpu-ubuntu2204-base',
    'v5litepod': 'v2-alpha-tpuv5-lite',
    'v5p': 'v2-alpha-tpuv5',
    'v6e': 'v2-alpha-tpuv6e',
}


def gcloud_tpu(*args: str, project: str | None = None) -> list[str]:
  return ['gcloud', 'compute', 'tpus', *args, *([f'--project={project}'] if project else [])]


def ssh(args: argparse.Namespace, remote_command: str, worker: str = 'all') -> list[str]:
  return gcloud_tpu('tpu-vm', 'ssh', args.name, f'--zone={args.zone}', f'--worker={worker}',
                    f'--command={remote_command}', project=args.project)


def default_runtime(accelerator_type: str) -> str | None:
  return DEFAULT_RUNTIMES.get(accelerator_type.rsplit('-', 1)[0])


def create_commands(args: argparse.Namespace) -> list[list[str]]:
  runtime = args.runtime_version or default_runtime(args.accelerator_type)
  if runtime is None:
    raise SystemExit(f'No default runtime for {args.accelerator_type}: pass --runtime_version '
                     '(gcloud compute tpus tpu-vm versions list).')
  capacity = ['--spot'] if args.spot else ['--preemptible'] if args.preemptible else []
  if args.queued:
    # The queued resource and the TPU VM it provisions share the name.
    return [gcloud_tpu('queued-resources', 'create', args.name, f'--node-id={args.name}',
                       f'--zone={args.zone}', f'--accelerator-type={args.accelerator_type}',
                       f'--runtime-version={runtime}', *capacity, project=args.project)]
  return [gcloud_tpu('tpu-vm', 'create', args.name, f'--zone={args.zone}',
                     f'--accelerator-type={args.accelerator_type}', f'--version={runtime}',
                     *capacity, project=args.project)]


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
  """Puts the code on every host, then installs it with jax[tpu] into a fresh Python."""
  # uv's own installer works whatever pip policy the VM image has (it writes to ~/.local/bin).
  install = (f'curl -LsSf {UV_INSTALLER} | sh && export PATH="$HOME/.local/bin:$PATH" && '
             f'uv venv --allow-existing --python={PYTHON_VERSION} {REMOTE_VENV} && '
             f'uv pip install --python={REMOTE_VENV}/bin/python --editable "$HOME/lepton_jax[tpu]"')
  if args.repo:
    fetch = (f'rm -rf {REMOTE_CODE} && git clone --depth=1 '
             f'--branch={shlex.quote(args.branch)} {shlex.quote(args.repo)} {REMOTE_CODE}')
    return [ssh(args, f'{fetch} && {install}')]
  # Ship the committed tree (HEAD): what runs is a commit you can name.
  archive = os.path.join(tempfile.gettempdir(), CODE_ARCHIVE)
  unpack = (f'rm -rf {REMOTE_CODE} && mkdir -p {REMOTE_CODE} && '
            f'tar -xzf "$HOME/{CODE_ARCHIVE}" -C {REMOTE_CODE}')
  return [
      ['git', '-C', str(REPO_ROOT), 'archive', '--format=tar.gz', f'--output={archive}', 'HEAD'],
      gcloud_tpu('tpu-vm', 'scp', archive, f'{args.name}:{CODE_ARCHIVE}', f'--zone={args.zone}',
                 '--worker=all', project=args.project),
      ssh(args, f'{unpack} && {install}'),
  ]


def train_command(args: argparse.Namespace) -> str:
  """The same training command line for every host, user values quoted for the remote shell."""
  return f'{REMOTE_VENV}/bin/python ' + shlex.join(
      ['-m', 'lepton_jax.train', f'--config={args.config}', f'--workdir={args.workdir}',
       *args.overrides])


def run_commands(args: argparse.Namespace) -> list[list[str]]:
  # nohup and closed stdio let ssh return while training goes on; the pid file is for `stop`.
  detached = (f'cd {REMOTE_CODE} || exit 1; nohup {train_command(args)} '
              f'> {REMOTE_LOG} 2>&1 < /dev/null & echo $! > {REMOTE_PID}')
  return [ssh(args, detached)]


def logs_commands(args: argparse.Namespace) -> list[list[str]]:
  return [ssh(args, f'tail -n 200 -F {REMOTE_LOG}', worker=str(args.worker))]


def stop_commands(args: argparse.Namespace) -> list[list[str]]:
  # SIGTERM, not SIGKILL: train.py writes a checkpoint before it exits.
  return [ssh(args, f'if [ -f {REMOTE_PID} ]; then kill -TERM "$(cat {REMOTE_PID})" || true; '
                    f'rm -f {REMOTE_PID}; fi')]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
  if args.queued:
    # --force also deletes the TPU VM the queued resource provisioned.
    return [gcloud_tpu('queued-resources', 'delete', args.name, f'--zone={args.zone}',
                       '--force', '--quiet', project=args.project)]
  return [gcloud_tpu('tpu-vm', 'delete', args.name, f'--zone={args.zone}', '--quiet',
                     project=args.project)]


COMMANDS = {
    'create': create_commands,
    'setup': setup_commands,
    'run': run_commands,
    'logs': logs_commands,
    'stop': stop_commands,
    'delete': delete_commands,
}


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--name', required=True, help='TPU VM (and queued resource) name.')
  common.add_argument('--zone', required=True, help='e.g. us-west4-a.')
  common.add_argument('--project', help='Google Cloud project; default: gcloud config.')
  common.add_argument('--dry_run', '--dry-run', action='store_true',
                      help='Print the commands instead of running them.')

  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)

  create = sub.add_parser('create', parents=[common], help='Create a TPU VM slice.')
  create.add_argument('--accelerator_type', '--accelerator-type', required=True,
                      help='e.g. v5litepod-16, v4-32, v6e-64.')
  create.add_argument('--runtime_version', '--runtime-version', '--version',
                      help='VM image; default by generation: ' + ', '.join(
                          f'{k}: {v}' for k, v in DEFAULT_RUNTIMES.items()))
  capacity = create.add_mutually_exclusive_group()
  capacity.add_argument('--spot', action='store_true', help='Spot capacity (can be preempted).')
  capacity.add_argument('--preemptible', action='store_true',
                        help='Legacy preemptible capacity (tpu-vm create only).')
  create.add_argument('--queued', action='store_true',
                      help='Request through a queued resource; waits for capacity.')

  setup = sub.add_parser('setup', parents=[common],
                         help='Copy the code to every host and pip install it with jax[tpu].')
  setup.add_argument('--repo', help='Clone this git URL instead of copying the local HEAD.')
  setup.add_argument('--branch', default='main', help='Branch or tag to clone with --repo.')

  run = sub.add_parser('run', parents=[common], help='Start training on every host.',
                       epilog='Other --config.KEY=VALUE arguments are passed to the trainer.')
  run.add_argument('--config', required=True, help='configs/NAME.py[:ARG], relative to the repo.')
  run.add_argument('--workdir', required=True,
                   help='gs://BUCKET/PATH: every host writes checkpoints there.')

  logs = sub.add_parser('logs', parents=[common], help="Follow one host's training log.")
  logs.add_argument('--worker', type=int, default=0, help='Host index; 0 logs the metrics.')

  sub.add_parser('stop', parents=[common], help='SIGTERM the trainer on every host.')
  delete = sub.add_parser('delete', parents=[common], help='Delete the TPU VM.')
  delete.add_argument('--queued', action='store_true', help='It was created with --queued.')
  return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  # Only `run` takes more: --config.KEY=VALUE overrides, forwarded untouched.
  overrides = [arg for arg in extra if args.command == 'run' and arg.startswith('--config.')]
  unknown = [arg for arg in extra if arg not in overrides]
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)}')
  if args.command == 'run':
    args.overrides = overrides
    if not args.workdir.startswith('gs://'):
      parser.error('--workdir must be gs://...: every host of the slice must see the same files.')
  if args.command == 'create' and args.queued and args.preemptible:
    parser.error('queued resources take --spot, not --preemptible.')
  return args


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  for command in COMMANDS[args.command](args):
    print(shlex.join(command), flush=True)
    if not args.dry_run:
      subprocess.run(command, check=True)


if __name__ == '__main__':
  main(sys.argv[1:])
