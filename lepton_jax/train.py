"""Train a Transformer LM from an ml_collections config.

  python -m lepton_jax.train --config=configs/stdlib_tiny.py --workdir=/tmp/run \
      [--config.total_steps=100 ...]

Restarting with the same workdir resumes from the latest complete checkpoint; SIGTERM
(preemption) writes a checkpoint and exits cleanly.
"""
import contextlib
import functools
import logging as std_logging
import os
import signal
import sys
import time

from absl import app, flags, logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags
import numpy as np

from lepton_jax import checkpoint, config_lib, data, distributed, experiment, flops, metrics
from lepton_jax import sample, sharding, steps, train_state

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer.')


def evaluate(eval_fn, params, eval_batches, batch_sharding) -> dict[str, float]:
  totals = {'loss_sum': 0.0, 'tokens': 0.0, 'correct': 0.0}
  for batch in eval_batches:
    sums = eval_fn(params, global_batch(batch, batch_sharding))
    totals = {k: totals[k] + float(sums[k]) for k in totals}
  loss = totals['loss_sum'] / max(totals['tokens'], 1.0)
  return {'eval/loss': loss, 'eval/perplexity': float(np.exp(loss)),
          'eval/accuracy': totals['correct'] / max(totals['tokens'], 1.0)}


def global_batch(local_batch: dict[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
  """Each process holds its rows; together they form one batch sharded over the mesh."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, v)
          for k, v in local_batch.items()}


class PreemptionWatch:
  """Notices SIGTERM. Multi-process runs agree on the step through JAX's coordination service."""

  def __init__(self):
    self._signalled = False
    self._previous_handler = None
    if jax.process_count() == 1:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del signum, frame
    self._signalled = True

  def close(self) -> None:
    """Gives SIGTERM back to whoever had it (a notebook kernel, a test runner)."""
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._signalled
    return multihost_utils.reached_preemption_sync_point(step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs (or resumes) the experiment; returns the last logged metrics."""
  config_lib.validate(config)
  is_coordinator = distributed.is_coordinator()
  mesh = sharding.make_mesh(config.mesh)
  rules = config.mesh.rules
  data_parallel = sharding.data_parallel_size(mesh, rules)
  if config.batch_size % (data_parallel * config.grad_accum_steps):
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the data-parallel '
                     f'size {data_parallel} x config.grad_accum_steps={config.grad_accum_steps}')

  run = experiment.build(config, workdir)
  tokenizer, model_config, model, tx = run.tokenizer, run.model_config, run.model, run.tx
  checkpointer = run.checkpointer

  train_iter = data.make_train_iterator(config, tokenizer, jax.process_index(),
                                        jax.process_count())
  eval_batches = data.make_eval_batches(config, tokenizer, jax.process_index(),
                                        jax.process_count())
  flops_per_token = flops.train_flops_per_token(model_config, config.seq_len)
  peak_flops = flops.peak_flops_per_device(model_config.dtype)

  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    abstract_state, state_sharding = train_state.abstract_state(model, tx, mesh, rules,
                                                                config.seq_len)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    replicated = sharding.replicated(mesh)
    latest = checkpointer.latest_step()
    if latest is None:
      state = train_state.init_state(model, tx, config.seed, config.seq_len, state_sharding)
    else:
      logging.info('Resuming from the checkpoint at step %d in %s', latest, workdir)
      state = checkpointer.restore(
          latest, checkpoint.abstract_like(abstract_state, state_sharding), train_iter,
          data_state_is_global=not config.data.streaming)

    train_fn = train_state.jit_train_step(model, tx, run.schedule, config, state_sharding,
                                          batch_sharding)
    eval_fn = jax.jit(functools.partial(steps.eval_step, model=model),
                      in_shardings=(state_sharding.params, batch_sharding),
                      out_shardings=replicated)

    step = int(state.step)
    writer = metrics.MetricWriter(workdir, first_step=step, active=is_coordinator)
    preemption = PreemptionWatch()
    bar = metrics.progress_bar(step, config.total_steps, is_coordinator)
    last_metrics, window_start, window_steps = {}, None, 0
    while step < config.total_steps:
      state, step_metrics = train_fn(state, global_batch(next(train_iter), batch_sharding))
      step += 1
      bar.update(1)
      if window_start is None:  # Start timing after the first (compiling) step.
        jax.block_until_ready(state.step)
        window_start, window_steps = time.perf_counter(), 0
      else:
        window_steps += 1

      is_last = step == config.total_steps
      should_eval = step % config.eval_every_steps == 0 or is_last
      if step % config.log_every_steps == 0 or should_eval:
        last_metrics = {k: float(v) for k, v in step_metrics.items()}  # Waits for the step.
        if window_steps:
          tokens_per_sec = (window_steps * config.batch_size * config.seq_len /
                            (time.perf_counter() - window_start))
          last_metrics['tokens_per_sec'] = tokens_per_sec
          if peak_flops:
            last_metrics['mfu'] = flops.mfu(tokens_per_sec / jax.device_count(), flops_per_token,
                                            peak_flops)
        if should_eval:
          last_metrics.update(evaluate(eval_fn, state.params, eval_batches, batch_sharding))
        writer.write(step, last_metrics)
        bar.set_postfix(loss=f"{last_metrics['train/loss']:.3f}")
        window_start, window_steps = time.perf_counter(), 0  # Evaluation is not training time.

      preempted = preemption.reached(step)
      if step % config.checkpoint_every_steps == 0 or step == config.total_steps or preempted:
        checkpointer.save(step, state, train_iter, run.meta, force=preempted)
      if preempted:
        logging.warning('Preempted at step %d: checkpoint written, exiting.', step)
        break
    bar.close()
    preemption.close()
    checkpointer.wait()
    checkpointer.close()

    if step == config.total_steps and config.sample.num_tokens:
      text = sample.sample_text(model, state.params, tokenizer, config.sample.prompt,
                                config.sample.num_tokens, config.sample.temperature,
                                config.sample.top_k, config.seq_len, config.seed)
      writer.write_text(step, 'sample', text)
      if is_coordinator:
        print(f'--- sample after {step} steps ---\n{text}\n---', flush=True)
  writer.close()
  return last_metrics


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with a one-line error for a --config.KEY override that names no field."""
  try:
    return flags.FLAGS(argv)
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


@contextlib.contextmanager
def command_line(program: str, argv: list[str]):
  """Set-up and errors of a --config/--workdir command.

  Bad config or data exits with one line naming what is wrong (`program: error: ...`) and no
  traceback.
  """
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if flags.FLAGS.workdir is None:
    raise app.UsageError('--workdir is required')
  quiet_library_info_logs()
  try:
    yield
  except (ValueError, FileNotFoundError) as e:
    logging.debug('Traceback of the error below:', exc_info=True)
    sys.exit(f'{program}: error: {e}')


def main(argv):
  with command_line('lepton-train', argv):
    distributed.initialize()
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


def run():
  """Console-script entry point (`lepton-train`)."""
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
