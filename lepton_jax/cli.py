"""The command line every entry point shares: flags, parsing, set-up and one-line errors.

No module of lepton_jax defines flags when imported, this one included: `run` defines --config,
--workdir and the multi-host flags just before parsing. An entry point may define its own flags
and hands its main to `run`:

  def main(argv):
    with cli.command_line('sample', argv):
      ...  # cli.FLAGS.config, cli.FLAGS.workdir

  if __name__ == '__main__':
    cli.run(main)

Bad config, data or input exits with one line naming what is wrong (`program: error: ...`).
"""
import contextlib
from collections.abc import Callable
import logging as std_logging
import os
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from lepton_jax import distributed

FLAGS = flags.FLAGS


def define_flags() -> None:
  """--config, --workdir and the multi-host flags (once per process)."""
  if 'workdir' in FLAGS:
    return
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer.')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, e.g. 10.0.0.2:1234.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes in the job.', lower_bound=1)
  flags.DEFINE_integer('process_id', None, 'Index of this process, 0 .. num_processes - 1.',
                       lower_bound=0)
  flags.DEFINE_integer(
      'cpu_devices', None, 'CPU-only runs: split this host into N JAX devices (e.g. one per '
      'core). XLA:CPU runs devices concurrently, so the many small ops of a small model, which '
      'one device runs one after another, spread over the cores; the mesh and the losses are '
      'unchanged in meaning (data=-1 takes all N). Unset, training takes one device per core '
      'for a small model and one device for a large one (flops.default_cpu_devices).',
      lower_bound=1)
  flags.DEFINE_string(
      'compilation_cache_dir', '~/.cache/lepton_jax/xla', "XLA's persistent compilation cache: a "
      'rerun of the same program loads it instead of compiling it again (keys hold the program, '
      "the jax version and the devices). '' turns it off; JAX_COMPILATION_CACHE_DIR wins.")


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with a one-line error for a --config.KEY override that names no field."""
  try:
    return FLAGS(argv)
  except (flags.UnrecognizedFlagError, config_flags.config_flags.FlagOrderError) as e:
    # A --config.KEY without --config, or before it.
    if isinstance(e, flags.UnrecognizedFlagError) and not e.flagname.startswith('config.'):
      raise
    sys.exit('FATAL Flags parsing error: --config.KEY overrides a config file: give '
             '--config=FILE before them (configs/base.py holds the defaults)')
  except (AttributeError, KeyError) as e:  # Raised by ml_collections for an unknown key.
    while isinstance(e, (AttributeError, KeyError)) and e.args:  # Unwrap to the message.
      e = e.args[0]
    reason = ' '.join(str(e).split())
    sys.exit(f'FATAL Flags parsing error: unknown config key {reason}')


def quiet_library_info_logs() -> None:
  """Keeps the progress bar readable: INFO lines only from lepton_jax, warnings from anyone."""
  own_code = os.path.dirname(os.path.abspath(__file__))
  # Every record that gets printed passes absl's handler: absl.logging's own and those of Python
  # loggers such as jax's (through the root logger), so the filter goes on the handler.
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or record.pathname.startswith(own_code))


def initialize_distributed(default_cpu_devices: Callable[[int], int] | None = None) -> str:
  """distributed.initialize with the multi-host flags, and the compilation cache; before any
  other JAX use. `default_cpu_devices(cores)` stands in for an unset --cpu_devices in a single
  process."""
  if FLAGS.compilation_cache_dir and not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.expanduser(FLAGS.compilation_cache_dir))
  return distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                FLAGS.cpu_devices, default_cpu_devices)


@contextlib.contextmanager
def command_line(program: str, argv: list[str], needs_workdir: bool = True,
                 default_cpu_devices: Callable[[int], int] | None = None):
  """Set-up and errors of a --config/--workdir command: checks the arguments, joins the
  multi-host job (before any other JAX use) and turns bad input into one line."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if needs_workdir and FLAGS.workdir is None:
    raise app.UsageError('--workdir is required')
  quiet_library_info_logs()
  try:
    initialize_distributed(default_cpu_devices)
    yield
  # FloatingPointError: training stopped at a non-finite step (config.nonfinite='stop');
  # FileExistsError: an output directory that would be overwritten.
  except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
    logging.debug('Traceback of the error below:', exc_info=True)
    sys.exit(f'{program}: error: {e}')


def run(main) -> None:
  """Runs `main(argv)` under absl with the shared flags, --config required, one-line errors."""
  define_flags()
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=parse_flags)
