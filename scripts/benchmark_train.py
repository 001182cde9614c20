"""Training throughput of any config: tokens/s and MFU of the jitted train step.

Times the same step `lepton-train` runs (same shardings, donation, optimizer) on random token
batches, so data loading and logging are not measured. Prints one line of JSON with medians.

  python scripts/benchmark_train.py --config=configs/shakespeare_char.py --config.model.vocab_size=65
  python scripts/benchmark_train.py --config=configs/stdlib_tiny.py --steps=30 --repeats=5
  python scripts/benchmark_train.py --config=... --cpu_devices=2  # one JAX device per CPU core
  python scripts/benchmark_train.py --config=... --part=fwd_bwd  # loss and gradients only

`--part=fwd_bwd` times the loss and its gradients as the step computes them (with the gradient
all-reduce across data-parallel devices, without clipping and the optimizer); `--part=fwd` the
loss alone. MFU is reported for whole steps only.
"""
import json
import statistics
import time

from absl import app, flags
import flax.linen as nn
import jax
import numpy as np
from ml_collections import config_flags

from lepton_jax import config_lib, data, distributed, flops, optim, sharding, steps, train_state
from lepton_jax.model import ModelConfig, Transformer

config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_integer('steps', 20, 'Timed steps per repeat.')
flags.DEFINE_integer('repeats', 5, 'Timed repeats; the median is reported.')
flags.DEFINE_enum('part', 'step', ['step', 'fwd_bwd', 'fwd'],
                  'What to time: the train step, only the loss and gradients, or only the loss.')
flags.DEFINE_string('workdir', '/tmp/lepton_benchmark', 'Where a trained tokenizer is cached '
                    '(only when config.model.vocab_size is 0).')


def resolved_model_config(config):
  if config.model.vocab_size:
    return config.model
  return config_lib.resolve_vocab(config.model, data.build_tokenizer(config.data, flags.FLAGS.workdir))


def jit_part(part: str, model, config, state_sharding, batch_sharding):
  """(state, batch) -> (state, output): the step's loss (fwd), or its gradients (fwd_bwd)."""
  def loss(params, batch):
    return steps.summed_loss(params, model, batch, jax.random.key(config.seed), config.z_loss,
                             deterministic=model.cfg.dropout == 0.0)[0]

  compute, out_sharding = {
      'fwd': (loss, sharding.replicated(state_sharding.step.mesh)),
      'fwd_bwd': (jax.grad(loss), state_sharding.params),  # Gradients placed as the step's.
  }[part]
  jitted = jax.jit(compute, in_shardings=(state_sharding.params, batch_sharding),
                   out_shardings=out_sharding)
  return lambda state, batch: (state, jitted(state.params, batch))


def main(argv):
  del argv
  distributed.initialize()
  config = flags.FLAGS.config
  config_lib.validate(config)
  model_config = resolved_model_config(config)
  model = Transformer(ModelConfig.from_config(model_config))
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  mesh = sharding.make_mesh(config.mesh)
  rules = config.mesh.rules

  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    _, state_sharding = train_state.abstract_state(model, tx, mesh, rules, config.seq_len)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    state = train_state.init_state(model, tx, config.seed, config.seq_len, state_sharding)
    if flags.FLAGS.part == 'step':
      step_fn = train_state.jit_train_step(model, tx, schedule, config, state_sharding,
                                           batch_sharding)
    else:
      step_fn = jit_part(flags.FLAGS.part, model, config, state_sharding, batch_sharding)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model_config.vocab_size, (config.batch_size, config.seq_len + 1),
                          dtype=np.int32)
    batch = jax.device_put({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}, batch_sharding)

    compile_start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - compile_start
    step_seconds = []
    for _ in range(flags.FLAGS.repeats):
      start = time.perf_counter()
      for _ in range(flags.FLAGS.steps):
        state, metrics = step_fn(state, batch)
      jax.block_until_ready(metrics)
      step_seconds.append((time.perf_counter() - start) / flags.FLAGS.steps)

  seconds = statistics.median(step_seconds)
  tokens_per_sec = config.batch_size * config.seq_len / seconds
  flops_per_token = flops.train_flops_per_token(model_config, config.seq_len)
  peak = flops.peak_flops_per_device(model_config.dtype)
  print(json.dumps({
      'impl': 'lepton_jax', 'device': jax.devices()[0].device_kind,
      'num_devices': jax.device_count(), 'tokens_per_sec': round(tokens_per_sec, 1),
      'ms_per_step': round(1000 * seconds, 3), 'compile_s': round(compile_seconds, 2),
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
  flags.mark_flags_as_required(['config'])
  app.run(main)
