"""Training throughput of any config: tokens/s and MFU of the jitted train step.

Times the same step `lepton-train` runs (same shardings, donation, optimizer) on random token
batches, so data loading and logging are not measured. Prints one line of JSON with medians.

  python scripts/benchmark_train.py --config=configs/shakespeare_char.py --config.model.vocab_size=65
  python scripts/benchmark_train.py --config=configs/stdlib_tiny.py --steps=30 --repeats=5
  python scripts/benchmark_train.py --config=... --cpu_devices=2  # one JAX device per CPU core
  python scripts/benchmark_train.py --config=... --part=fwd_bwd  # loss and gradients only
  python scripts/benchmark_train.py --config=configs/lora_adapt.py:/tmp/lora_base \
      --config.peft.method=houlsby --config.lora.targets='()'  # a fine-tune: its base's shape

`--part=fwd_bwd` times the loss and its gradients as the step computes them (with the gradient
all-reduce across data-parallel devices, without clipping and the optimizer); `--part=fwd` the
loss alone. MFU is reported for whole steps only.

`--part=loop` runs lepton-train's loop itself (the config's data and logging cadence, monitoring
off) for `--steps` steps and then the isolated step above for as many, alternating `--repeats`
times, and prints the median seconds per step of each (the loop's perf/step_seconds:
compilation, evaluation and checkpoints excluded) and `loop_overhead`, what the loop adds to the
step (loop / step - 1). `--monitoring` logs every step and adds a loop run with each part of
lepton_jax/monitor.py that can be switched on, and one with all of them, and what one record's
memory figures cost, which every variant pays:

  python scripts/benchmark_train.py --config=configs/shakespeare_char.py \
      --config.data.path=.../tinyshakespeare.txt --part=loop --steps=200 --repeats=3
  python scripts/benchmark_train.py --config=configs/stdlib_tiny.py --part=loop --monitoring
"""
import json
import os
import statistics
import tempfile
import time

from absl import flags
import jax
import numpy as np

from lepton_jax import adapters, cli, config_lib, data, experiment, flops, monitor, objectives
from lepton_jax import pretrained, sharding, steps, train, train_state
from lepton_jax.data import packing
from lepton_jax.model import ModelConfig, Transformer

cli.define_flags()
flags.DEFINE_integer('steps', 20, 'Timed steps per repeat.')
flags.DEFINE_integer('repeats', 5, 'Timed repeats; the median is reported.')
flags.DEFINE_enum('part', 'step', ['step', 'fwd_bwd', 'fwd', 'loop'],
                  'What to time: the train step, only the loss and gradients, only the loss, or '
                  'the training loop with each monitoring part on and off.')
flags.DEFINE_bool('monitoring', False, "--part=loop: also time each of monitor.py's parts on.")
DEFAULT_WORKDIR = '/tmp/lepton_benchmark'  # Where a trained tokenizer is cached (vocab_size 0).


def resolved_model_config(config):
  if config.model.vocab_size:
    return config.model
  workdir = flags.FLAGS.workdir or DEFAULT_WORKDIR
  return config_lib.resolve_vocab(config.model, data.build_tokenizer(config.data, workdir))


def monitoring_variants(steps_: int) -> dict[str, dict]:
  """Config overrides: everything of monitor.py that can be off, off; then each part on."""
  off = {'profile.num_steps': 0, 'hang_timeout_s': 0.0, 'loss_spike.window': 0,
         'wandb.project': ''}
  parts = {'loss_spike': {'loss_spike.window': 10},
           'watchdog': {'hang_timeout_s': 3600.0},
           'profile': {'profile.start_step': 2, 'profile.num_steps': steps_},
           'wandb_offline': {'wandb.project': 'lepton-benchmark', 'wandb.mode': 'offline'}}
  variants = {'off': off, **{name: {**off, **part} for name, part in parts.items()}}
  variants['all'] = {**off, **{k: v for part in parts.values() for k, v in part.items()}}
  return variants


def time_loop(config) -> dict:
  """Median perf/step_seconds of lepton-train's loop under each monitoring variant, beside the
  isolated step's seconds on the same config."""
  overrides = {'total_steps': flags.FLAGS.steps, 'sample.num_tokens': 0,
               'eval_every_steps': 10 * flags.FLAGS.steps,
               'checkpoint_every_steps': flags.FLAGS.steps}
  if flags.FLAGS.monitoring:
    overrides['log_every_steps'] = 1  # What each part costs a logged record.
  config = config_lib.override(config, overrides)
  root = flags.FLAGS.workdir or tempfile.mkdtemp(prefix='lepton_loop_benchmark_')
  if config.data.tokenizer == 'sentencepiece' and not config.data.tokenizer_path:
    config.data.tokenizer_path = data.tokenizers.trained_model_path(config.data, root)  # Once.
  variants = monitoring_variants(flags.FLAGS.steps)
  if not flags.FLAGS.monitoring:
    variants = {'off': variants['off']}
  seconds = {name: [] for name in variants}
  step = StepTimer(config, 'step')
  step_seconds = []
  for repeat in range(flags.FLAGS.repeats):
    for name, overrides in variants.items():
      workdir = os.path.join(root, f'{name}_{repeat}')
      train.train_and_evaluate(config_lib.override(config, overrides), workdir)
      with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
        records = [json.loads(line) for line in f]
      timed = [r['perf/step_seconds'] for r in records if 'perf/step_seconds' in r]
      seconds[name] += timed[1:] or timed  # The first window warms up.
    step_seconds.append(step.seconds_per_step(flags.FLAGS.steps))
  loop_ms = {name: round(1000 * statistics.median(s), 3) for name, s in seconds.items()}
  step_ms = 1000 * statistics.median(step_seconds)
  report = {'part': 'loop', 'steps': flags.FLAGS.steps, 'repeats': flags.FLAGS.repeats,
            'num_devices': jax.device_count(), 'ms_per_step': loop_ms,
            'isolated_step_ms': round(step_ms, 3),
            'loop_overhead': round(loop_ms['off'] / step_ms - 1, 4)}
  if flags.FLAGS.monitoring:
    start = time.perf_counter()
    for _ in range(1000):
      monitor.memory_figures()
    report['memory_figures_ms_per_record'] = round(time.perf_counter() - start, 4)
  return report


def jit_part(part: str, model, config, layout: train_state.Layout, batch_sharding):
  """(state, frozen, batch) -> (state, output): the step's loss (fwd), or its gradients
  (fwd_bwd, with respect to the trainable params)."""
  def loss(trainable, frozen, batch):
    return steps.summed_loss(steps.model_variables(trainable, frozen), model, batch,
                             jax.random.key(config.seed), objectives.from_config(config, model),
                             deterministic=model.cfg.dropout == 0.0)[0]

  state_shardings = layout.state_shardings
  compute, out_sharding = {
      'fwd': (loss, sharding.replicated(state_shardings.step.mesh)),
      'fwd_bwd': (jax.grad(loss), state_shardings.trainable),  # Gradients placed as the step's.
  }[part]
  jitted = jax.jit(compute, in_shardings=(state_shardings.trainable, layout.frozen_shardings,
                                          batch_sharding),
                   out_shardings=out_sharding)
  return lambda state, frozen, batch: (state, jitted(state.trainable, frozen, batch))


# Steps dispatched ahead of the host: XLA:CPU deadlocks in a cross-device all-reduce when some
# hundreds of multi-device steps are queued at once (200 on 2 devices did; 30 never has).
MAX_QUEUED_STEPS = 16


class StepTimer:
  """The jitted `part` of the config's train step on a random token batch, compiled once."""

  def __init__(self, config, part: str):
    config = pretrained.resolve(config)  # A fine-tune times its base's shape (random weights).
    self.model_config = ModelConfig.from_config(resolved_model_config(config), config.lora,
                                                config.quant, config.prune, config.peft,
                                                config.seed)
    model = Transformer(self.model_config)
    tx, schedule = experiment.make_optimizer(config)
    mesh = sharding.make_mesh(config.mesh)
    rules = config.mesh.rules
    self._mesh_context = lambda: sharding.use_mesh(mesh, rules)
    with self._mesh_context():
      layout = train_state.make_layout(model, tx, mesh, rules, config.seq_len,
                                       adapters.trainable_patterns(config))
      batch_sharding = sharding.batch_sharding(mesh, rules)
      self._state, self._frozen = train_state.init_state(model, tx, config.seed, config.seq_len,
                                                         layout)
      if part == 'step':
        self._step_fn = train_state.jit_train_step(model, tx, schedule, config, layout,
                                                   batch_sharding, experiment.penalty(config))
      else:
        self._step_fn = jit_part(part, model, config, layout, batch_sharding)
      rng = np.random.default_rng(0)
      tokens = rng.integers(0, self.model_config.vocab_size,
                            (config.batch_size, config.seq_len + 1), dtype=np.int32)
      batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
      if config.data.document_masking:  # The pipeline's columns; documents end at id 0 here
        # (the attention mask costs the same wherever they end).
        batch['segment_ids'], batch['positions'] = packing.document_segments(batch['inputs'], 0)
      self._batch = jax.device_put(batch, batch_sharding)
      start = time.perf_counter()
      self._run(1)
      self.compile_seconds = time.perf_counter() - start

  def _run(self, steps: int) -> None:
    for step in range(steps):
      self._state, metrics = self._step_fn(self._state, self._frozen, self._batch)
      if step % MAX_QUEUED_STEPS == MAX_QUEUED_STEPS - 1:
        jax.block_until_ready(metrics)
    jax.block_until_ready(metrics)

  def seconds_per_step(self, steps: int) -> float:
    with self._mesh_context():
      start = time.perf_counter()
      self._run(steps)
      return (time.perf_counter() - start) / steps


def main(argv):
  del argv
  cli.initialize_distributed(train.default_cpu_devices)  # As lepton-train would.
  config = flags.FLAGS.config
  config_lib.validate(config)
  if flags.FLAGS.part == 'loop':
    print(json.dumps(time_loop(config)))
    return
  timer = StepTimer(config, flags.FLAGS.part)
  seconds = statistics.median(timer.seconds_per_step(flags.FLAGS.steps)
                              for _ in range(flags.FLAGS.repeats))
  model_config = timer.model_config
  tokens_per_sec = config.batch_size * config.seq_len / seconds
  flops_per_token = flops.train_flops_per_token(model_config, config.seq_len)
  peak = flops.peak_flops_per_device(model_config.dtype)
  print(json.dumps({
      'impl': 'lepton_jax', 'device': jax.devices()[0].device_kind,
      'num_devices': jax.device_count(), 'tokens_per_sec': round(tokens_per_sec, 1),
      'ms_per_step': round(1000 * seconds, 3), 'compile_s': round(timer.compile_seconds, 2),
      'model_tflops_per_sec_per_device': round(
          tokens_per_sec * flops_per_token / jax.device_count() / 1e12, 4),
      'peak_tflops_per_device': peak and round(peak / 1e12, 4),
      'mfu': flops.mfu(tokens_per_sec / jax.device_count(), flops_per_token, peak)
             if flags.FLAGS.part == 'step' else None,
      'part': flags.FLAGS.part,
      'batch_size': config.batch_size, 'seq_len': config.seq_len,
      'num_layers': model_config.num_layers, 'd_model': model_config.d_model,
      'vocab_size': model_config.vocab_size, 'dtype': model_config.dtype,
  }))


if __name__ == '__main__':
  cli.run(main)
