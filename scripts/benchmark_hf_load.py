"""How long `hf.load` takes and how much host memory it needs beyond the model it loads.

  python scripts/benchmark_hf_load.py [--d_model=1024 --num_layers=22 --repeats=3 --dir=/tmp/x]

Builds a random Llama-style model (~410M params at the defaults) with lepton, writes it with
`hf.save` in float32 and in bfloat16, then loads each in a fresh process, alternating, and
reports medians of the load time, the peak RSS growth (VmHWM minus VmRSS before loading), the
bytes of the loaded arrays, and the transient: peak growth minus the loaded arrays, which on CPU
live in host memory themselves. A loader that held the whole checkpoint besides the model would
show a transient near the checkpoint size; slice-by-slice reads keep it small.
"""
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_integer('d_model', 1024, 'Model width.')
flags.DEFINE_integer('num_layers', 22, 'Layers.')
flags.DEFINE_integer('repeats', 3, 'Loads per dtype (alternating).')
flags.DEFINE_string('dir', '/tmp/lepton_hf_load_benchmark', 'Where the checkpoints are written.')
flags.DEFINE_string('measure', None, 'Internal: load this directory and print JSON.')
FLAGS = flags.FLAGS


def _status_kb(field: str) -> int:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def measure(path: str) -> dict:
  """Runs in a fresh process: one load, its time and memory."""
  import jax  # pylint: disable=g-import-not-at-top
  from lepton_jax import hf  # pylint: disable=g-import-not-at-top
  jax.devices()  # Backend start-up is not loading.
  before = _status_kb('VmRSS') * 1024
  start = time.perf_counter()
  _, variables = hf.load(path)
  jax.block_until_ready(variables)
  seconds = time.perf_counter() - start
  peak = _status_kb('VmHWM') * 1024
  loaded = sum(x.nbytes for x in jax.tree.leaves(variables))
  return {'seconds': seconds, 'peak_growth': peak - before, 'loaded': loaded}


def build(path: str, dtype: str) -> int:
  """Writes the random model at `path` (once); returns the checkpoint's bytes."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lepton_jax import config_lib, hf  # pylint: disable=g-import-not-at-top
  from lepton_jax.model import ModelConfig, Transformer  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(path, 'config.json')):
    config = config_lib.model_config()
    config.update(vocab_size=32_000, d_model=FLAGS.d_model, num_layers=FLAGS.num_layers,
                  num_heads=FLAGS.d_model // 64, num_kv_heads=FLAGS.d_model // 128, head_dim=64,
                  d_ff=4 * FLAGS.d_model, param_dtype=dtype, dtype=dtype)
    model = Transformer(ModelConfig.from_config(config))
    variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))()
    hf.save(model, nn.unbox(variables), path)
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
             if f.endswith('.safetensors'))


def main(argv):
  del argv
  if FLAGS.measure:
    print(json.dumps(measure(FLAGS.measure)))
    return
  sizes = {dtype: build(os.path.join(FLAGS.dir, dtype), dtype) for dtype in ('float32', 'bfloat16')}
  runs = {dtype: [] for dtype in sizes}
  for _ in range(FLAGS.repeats):
    for dtype in sizes:
      out = subprocess.run([sys.executable, __file__, f'--measure={os.path.join(FLAGS.dir, dtype)}'],
                           check=True, capture_output=True, text=True).stdout
      runs[dtype].append(json.loads(out.strip().splitlines()[-1]))
  print('| dtype | checkpoint | load s | peak RSS growth | loaded arrays | transient | '
        'transient / checkpoint |')
  print('|---|---|---|---|---|---|---|')
  for dtype, results in runs.items():
    median = lambda key: statistics.median(r[key] for r in results)
    transient = median('peak_growth') - median('loaded')
    print(f'| {dtype} | {sizes[dtype] / 2**30:.2f} GiB | {median("seconds"):.2f} | '
          f'{median("peak_growth") / 2**30:.2f} GiB | {median("loaded") / 2**30:.2f} GiB | '
          f'{transient / 2**30:.2f} GiB | {transient / sizes[dtype]:.0%} |')


if __name__ == '__main__':
  app.run(main)
