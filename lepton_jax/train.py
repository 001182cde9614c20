"""Train a Transformer LM from an ml_collections config.

  python -m lepton_jax.train --config=configs/stdlib_tiny.py --workdir=/tmp/run \
      [--config.total_steps=100 ...]

Restarting with the same workdir resumes from the latest complete checkpoint; SIGTERM
(preemption) writes a checkpoint and exits cleanly.
"""
import signal
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from lepton_jax import checkpoint, cli, config_lib, data, distill, distributed, evals, experiment
from lepton_jax import adalora, dpo_reference, flops
from lepton_jax import metrics, monitor, objectives, pretrained, sample, sharding, train_state


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


class NonFiniteGuard:
  """What a step with a non-finite loss, gradient norm or update does (`config.nonfinite`).

  `stop` raises before that step's state can be saved or evaluated, so the run ends with the
  checkpoint before it as the latest; `skip` (the step then left the state unchanged, see
  steps.train_step) counts and goes on, and raises after `max_consecutive` such steps in a row.
  """

  def __init__(self, mode: str, max_consecutive: int):
    self.mode, self.max_consecutive = mode, max_consecutive
    self.skipped, self.consecutive = 0, 0

  def check(self, step: int, step_metrics: dict[str, float]) -> None:
    if not step_metrics['nonfinite']:
      self.consecutive = 0
      return
    values = (f"loss {step_metrics['train/loss']}, gradient norm "
              f"{step_metrics['train/grad_norm']}, learning rate {step_metrics['learning_rate']}")
    if self.mode == 'stop':
      raise FloatingPointError(f'step {step} is not finite ({values}); stopped before saving it. '
                               "config.nonfinite='skip' drops such steps instead")
    self.skipped, self.consecutive = self.skipped + 1, self.consecutive + 1
    logging.warning('Skipped step %d: not finite (%s)', step, values)
    if self.consecutive >= self.max_consecutive:
      raise FloatingPointError(f'step {step}: {self.consecutive} non-finite steps in a row '
                               f'(config.max_consecutive_skips={self.max_consecutive}; {values})')


def check_int8_training(quant: ml_collections.ConfigDict, lora: ml_collections.ConfigDict,
                        init_from: str) -> None:
  """What config.quant can mean in training: int8 weights either fake-quantized (qat) or frozen
  under LoRA adapters (QLoRA); else they are applied when a trained model is loaded."""
  if quant.weights == 'none' or quant.qat:
    return
  if not (lora.targets and init_from):
    raise ValueError(f'config.quant.weights={quant.weights!r} trains LoRA adapters over an int8 '
                     'base (QLoRA): set config.lora.targets and config.init_from; or '
                     'config.quant.qat=True to train the float weights through int8; or train in '
                     'float and quantize when loading (scripts/quantize.py, lepton-eval)')
  if quant.activations != 'none':
    raise ValueError(f'config.quant.activations={quant.activations!r}: int8 activations have '
                     'no gradient, so a QLoRA base runs weight-only; W8A8 trains with '
                     'config.quant.qat=True')
  if quant.kernel == 'pallas':
    raise ValueError("config.quant.kernel='pallas': the Pallas int8 kernels have no gradient "
                     "rule; QLoRA trains with 'xla' ('auto' picks it in training)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs (or resumes) the experiment; returns the last logged metrics."""
  config = pretrained.resolve(config)
  config_lib.validate(config)
  check_int8_training(config.quant, config.lora, config.init_from)
  if config.quant.weights != 'none' and not config.quant.qat:
    config.quant.kernel = 'xla'  # A copy (init_from is set): the differentiable int8 matmul.
  if config.data.filters.steps:  # Decontamination reads config.data alone: add the task files.
    config = data.filters.with_eval_files(config)
  is_coordinator = distributed.is_coordinator()
  run_monitor = monitor.Monitor(config, workdir, active=is_coordinator)
  mesh = sharding.make_mesh(config.mesh)
  rules = config.mesh.rules
  data_parallel = sharding.data_parallel_size(mesh, rules)
  if config.batch_size % (data_parallel * config.grad_accum_steps):
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the data-parallel '
                     f'size {data_parallel} x config.grad_accum_steps={config.grad_accum_steps}')

  run = experiment.build(config, workdir, same_split=True)
  if is_coordinator:
    experiment.save_run_config(config, run, workdir)
  tokenizer, model, checkpointer = run.tokenizer, run.model, run.checkpointer
  if config.sample.num_tokens:  # A sample that cannot fit fails now, not after training.
    sample.check_fits(run.model_config, tokenizer, config.sample)
  tx, schedule = experiment.make_optimizer(config)

  peak_flops = flops.peak_flops_per_device(run.model_config.dtype)

  with sharding.use_mesh(mesh, rules):
    objective = objectives.from_config(config, model)
    layout = train_state.make_layout(model, tx, mesh, rules, config.seq_len, run.trainable,
                                     objective.params_copy)
    frozen_matmuls = flops.frozen_matmul_params(layout.variables, layout.trainable_mask,
                                                run.model_config.tie_embeddings)
    flops_per_token = flops.objective_flops_per_token(config, run.model_config, frozen_matmuls)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    latest = checkpointer.latest_step()
    precompute = config.objective == 'dpo' and config.dpo.precompute_ref_log_probs
    start_from = None
    if config.init_from and (latest is None or precompute):
      logging.info('Starting from %s', config.init_from)
      start_from = pretrained.load_variables(
          config, model, checkpoint.abstract_like(layout.variables, layout.variable_shardings))
    reference_logps = None  # DPO's reference log-probs, once (a resumed run's: the same again).
    if precompute:
      reference_logps = dpo_reference.precompute(
          model, train_state.start_variables(model, config.seed, config.seq_len, layout,
                                             start_from),
          config.dpo.loss, config.batch_size, mesh, rules)
    train_iter = data.make_train_iterator(config, tokenizer, jax.process_index(),
                                          jax.process_count(), reference_logps)
    if config.data.filters.steps and is_coordinator:
      data.filters.write_report(config.data, workdir)
    # The validation loss and config.evals; task files are read and data tokenized here, before
    # the first step.
    evaluators = evals.build(config, model, tokenizer, mesh, rules,
                             reference_logps=reference_logps)
    del reference_logps  # It holds the starting variables; a resumed run needs them no more.
    start_from = start_from if latest is None else None
    teacher = None  # The frozen teacher the step reads besides the run's variables.
    if config.objective == 'distill':
      teacher = distill.load(config, tokenizer, run.model_config, mesh, rules)
    if latest is None:
      state, frozen = train_state.init_state(model, tx, config.seed, config.seq_len, layout,
                                             start_from)
      frozen_from = checkpointer.save_frozen(frozen, config.init_from, start_from)
    else:
      logging.info('Resuming from the checkpoint at step %d in %s', latest, workdir)
      with run_monitor.timed('checkpoint_restore'):
        state, frozen = checkpointer.restore(latest, layout, train_iter,
                                             data_state_is_global=not config.data.streaming)
      frozen_from = checkpointer.frozen_reference(latest)
      if teacher:
        teacher.check_resumed(checkpointer.teacher_reference(latest), workdir)
    meta = dict(run.meta, frozen_from=frozen_from) if frozen_from else run.meta
    step_layout, step_frozen = layout, frozen
    if teacher:
      meta = dict(meta, teacher=teacher.reference)
      step_layout, step_frozen = teacher.step_layout(layout), teacher.step_frozen(frozen)

    train_fn = train_state.jit_train_step(model, tx, schedule, config, step_layout,
                                          batch_sharding, experiment.penalty(config))
    variables = lambda: state.variables(frozen)

    step = int(state.step)
    writer = metrics.MetricWriter(workdir, first_step=step, active=is_coordinator,
                                  wandb=config.wandb, run_config=config)
    preemption = PreemptionWatch()
    guard = NonFiniteGuard(config.nonfinite, config.max_consecutive_skips)
    bar = metrics.progress_bar(step, config.total_steps, is_coordinator)
    last_metrics = {}
    window = None  # (step, time) where the current throughput window starts.

    def report(step: int, device_metrics) -> None:
      """Checks and logs a finished step's metrics; the only place the host waits on a step."""
      nonlocal last_metrics, window
      step_metrics = {k: float(v) for k, v in device_metrics.items()}
      finished = time.perf_counter()
      guard.check(step, step_metrics)
      run_monitor.step_finished(step, step_metrics)
      due = evals.due(evaluators, step, config.total_steps)
      if not (step % config.log_every_steps == 0 or due):
        return
      del step_metrics['nonfinite']
      if config.nonfinite == 'skip':
        step_metrics['train/skipped_steps'] = guard.skipped
      window_step, window_time = window
      if step > window_step:
        tokens_per_sec = ((step - window_step) * config.batch_size * config.seq_len /
                          (finished - window_time))
        step_metrics['tokens_per_sec'] = tokens_per_sec
        if peak_flops:
          step_metrics['mfu'] = flops.mfu(tokens_per_sec / jax.device_count(), flops_per_token,
                                          peak_flops)
      window = (step, finished)
      if due:
        with run_monitor.timed('eval'):
          step_metrics.update(evals.run(due, variables()))
        window = (step, time.perf_counter())  # Evaluation is not training time.
      run_monitor.write(step, step_metrics)
      bar.set_postfix(loss=f"{step_metrics['train/loss']:.3f}")
      last_metrics = step_metrics

    # Metrics are read one step behind (nanodo): step k's while step k + 1 runs, so logging never
    # makes the host wait mid-step. Steps that evaluate, checkpoint or end the run are read at once.
    pending = None
    run_monitor.start(step, writer, train_iter)
    try:
      while step < config.total_steps:
        run_monitor.step_begins(step + 1, state)
        with run_monitor.data_wait():
          batch = global_batch(next(train_iter), batch_sharding)
        state, device_metrics = train_fn(state, step_frozen, batch)
        step += 1
        bar.update(1)
        if pending:
          report(*pending)
        pending = (step, device_metrics)
        if window is None:  # Start timing after the first (compiling) step.
          jax.block_until_ready(state.step)
          window = (step, time.perf_counter())

        preempted = preemption.reached(step)
        should_save = (step % config.checkpoint_every_steps == 0 or
                       step == config.total_steps or preempted)
        if should_save or evals.due(evaluators, step, config.total_steps):
          report(*pending)  # Before saving: a non-finite step is never written.
          pending = None
        if should_save:
          with run_monitor.timed('checkpoint_save'):
            checkpointer.save(step, state, train_iter, meta, force=preempted)
        run_monitor.step_ends()
        if preempted:
          logging.warning('Preempted at step %d: checkpoint written, exiting.', step)
          break
    finally:
      bar.close()
      preemption.close()
      with run_monitor.timed('checkpoint_save'):
        checkpointer.wait()
      checkpointer.close()
      run_monitor.close()

    if step == config.total_steps and config.peft.method == 'adalora':
      adalora.write_ranks(workdir, state.trainable, writer, step, is_coordinator)
    if step == config.total_steps and config.sample.num_tokens:
      (text,) = sample.sample_texts(model, variables(), tokenizer, [config.sample.prompt],
                                    config.sample.num_tokens, **sample.settings(config.sample))
      writer.write_text(step, 'sample', text)
      if is_coordinator:
        print(f'--- sample after {step} steps ---\n{text}\n---', flush=True)
  writer.close()
  return last_metrics


def default_cpu_devices(cores: int) -> int:
  """--cpu_devices left unset: the count that suits --config's model (its init_from's) here."""
  return flops.default_cpu_devices(pretrained.resolve(cli.FLAGS.config), cores)


def main(argv):
  with cli.command_line('lepton-train', argv, default_cpu_devices=default_cpu_devices):
    train_and_evaluate(cli.FLAGS.config, cli.FLAGS.workdir)


def run():
  """Console-script entry point (`lepton-train`)."""
  cli.run(main)


if __name__ == '__main__':
  run()
