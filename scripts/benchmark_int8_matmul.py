"""int8 matmuls on this backend's XLA: W8A8 and weight-only forms against f32, both weight layouts.

  python scripts/benchmark_int8_matmul.py [--ms=1,8,64] [--sizes=1024,2048,4096] [--reps=5]

For every M x K x N (K = N = size): f32, the W8A8 int8 dot (int32 accumulator, rescaled) and
the candidate XLA forms of a weight-only (int8 weights, f32 or bf16 activations) matmul, with
weights stored [N, K] (contracting both last dims) and [K, N]. Each variant is jitted and
compiled first; each rep times every variant once, in turn, so all of them see the same machine;
a time is the mean of enough back-to-back calls to fill --min_seconds. Prints the CPU, then a
markdown table, a row per shape, of medians in ms and their ratios to f32 [K,N] (> 1x: faster),
then the load average: on a shared machine, quote quiet runs. Columns: cvt+dot converts the int8
weights to x's dtype, then dots; mul+reduce is one fused multiply and sum over K; the columns
int8_matmul and int8_weight_matmul are lepton's XLA path as built (on CPU: one row padded to two;
weight-only in f32, as mul+reduce up to 128 rows); "bf16 x:" columns take bf16 activations.
"""
import datetime
import os
import re
import statistics
import subprocess
import time

from absl import app, flags
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from lepton_jax.kernels import int8_matmul as kernels

flags.DEFINE_list('ms', ['1', '8', '64'], 'Rows of x (tokens per matmul).')
flags.DEFINE_list('sizes', ['1024', '2048', '4096'], 'K = N.')
flags.DEFINE_integer('reps', 5, 'Alternating rounds; medians are reported.', lower_bound=1)
flags.DEFINE_float('min_seconds', 0.05, 'Calls per timing fill at least this long.')
FLAGS = flags.FLAGS

NT = (((1,), (1,)), ((), ()))  # x_MK . w_NK, contracting both last dims.
NN = (((1,), (0,)), ((), ()))  # x_MK . w_KN.


def variants(x_MK, w_NK, x_scale_M1, w_scale_N):
  """name -> (function, its arguments); the int8 and bf16 activations derive from f32 x_MK."""
  xq_MK = jnp.clip(jnp.round(x_MK / x_scale_M1), -127, 127).astype(jnp.int8)
  w_KN, xb_MK = w_NK.T.copy(), x_MK.astype(jnp.bfloat16)
  wf_NK = w_NK.astype(jnp.float32)
  wf_KN = wf_NK.T.copy()
  i32 = dict(preferred_element_type=jnp.int32)
  f32 = dict(preferred_element_type=jnp.float32)
  return {
      'f32 [K,N]': (lambda x, w: lax.dot_general(x, w, NN), (x_MK, wf_KN)),
      'f32 [N,K]': (lambda x, w: lax.dot_general(x, w, NT), (x_MK, wf_NK)),
      'W8A8 [K,N]': (lambda x, w, xs, ws: lax.dot_general(x, w, NN, **i32) * xs * ws,
                          (xq_MK, w_KN, x_scale_M1, w_scale_N)),
      'W8A8 [N,K]': (lambda x, w, xs, ws: lax.dot_general(x, w, NT, **i32) * xs * ws,
                          (xq_MK, w_NK, x_scale_M1, w_scale_N)),
      'int8_matmul': (
          lambda x, w, xs, ws: kernels.int8_matmul(x, w, xs, ws, implementation='xla'),
          (xq_MK, w_NK, x_scale_M1, w_scale_N)),
      'W8A16 cvt+dot [K,N]': (
          lambda x, w, ws: lax.dot_general(x, w.astype(x.dtype), NN, **f32) * ws,
          (x_MK, w_KN, w_scale_N)),
      'W8A16 cvt+dot [N,K]': (
          lambda x, w, ws: lax.dot_general(x, w.astype(x.dtype), NT, **f32) * ws,
          (x_MK, w_NK, w_scale_N)),
      'W8A16 mul+reduce [N,K]': (
          lambda x, w, ws: jnp.sum(x[:, None, :] * w.astype(x.dtype), axis=-1) * ws,
          (x_MK, w_NK, w_scale_N)),
      'int8_weight_matmul': (
          lambda x, w, ws: kernels.int8_weight_matmul(x, w, ws, implementation='xla'),
          (x_MK, w_NK, w_scale_N)),
      'bf16 x: cvt+dot [N,K]': (
          lambda x, w, ws: lax.dot_general(x, w.astype(x.dtype), NT, **f32) * ws,
          (xb_MK, w_NK, w_scale_N)),
      'bf16 x: int8_weight_matmul': (
          lambda x, w, ws: kernels.int8_weight_matmul(x, w, ws, implementation='xla'),
          (xb_MK, w_NK, w_scale_N)),
  }


def seconds_per_call(fn, args, calls: int) -> float:
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def cpu_line() -> str:
  """lscpu's model name, CPU count and vector flags: CPU figures only compare between equals."""
  lscpu = dict(line.split(':', 1) for line in subprocess.run(
      ['lscpu'], capture_output=True, text=True, check=True).stdout.splitlines() if ':' in line)
  simd = sorted(f for f in lscpu['Flags'].split() if re.match(r'avx|amx|fma', f))
  return f'{lscpu["Model name"].strip()}, {lscpu["CPU(s)"].strip()} CPUs, {" ".join(simd)}'


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  print(f'{datetime.date.today()}, jax {jax.__version__} on {jax.default_backend()}, {cpu_line()}')
  for size in map(int, FLAGS.sizes):
    w_NK = jnp.asarray(rng.integers(-127, 128, (size, size)), jnp.int8)
    w_scale_N = jnp.asarray(rng.uniform(1e-3, 2e-2, size), jnp.float32)
    for m in map(int, FLAGS.ms):
      x_MK = jnp.asarray(rng.normal(size=(m, size)), jnp.float32)
      x_scale_M1 = jnp.max(jnp.abs(x_MK), axis=1, keepdims=True) / 127
      runs = {name: (jax.jit(fn), args)
              for name, (fn, args) in variants(x_MK, w_NK, x_scale_M1, w_scale_N).items()}
      calls = {}
      for name, (fn, args) in runs.items():
        seconds_per_call(fn, args, 1)  # Compiles.
        calls[name] = max(1, int(FLAGS.min_seconds / seconds_per_call(fn, args, 1)))
      times = {name: [] for name in runs}
      for _ in range(FLAGS.reps):
        for name, (fn, args) in runs.items():
          times[name].append(seconds_per_call(fn, args, calls[name]))
      medians = {name: statistics.median(t) for name, t in times.items()}
      if size == int(FLAGS.sizes[0]) and m == int(FLAGS.ms[0]):
        print(f'| M x K x N | {" | ".join(medians)} |\n|---|{"---|" * len(medians)}')
      cells = (f'{t * 1e3:.3g} ({medians["f32 [K,N]"] / t:.2f}x)' for t in medians.values())
      print(f'| {m} x {size} x {size} | {" | ".join(cells)} |', flush=True)
  print(f'load average (1, 5, 15 min) at the end: {os.getloadavg()}')


if __name__ == '__main__':
  app.run(main)
