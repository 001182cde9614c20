"""int8 matmuls: W8A8 (int8 x int8, exact int32 accumulator, rescaled) and weight-only (W8A16).

Weights are stored [N, K] (output channels first) and both operands contract their last dim:
the layout XLA:CPU's int8 dot runs fastest in, and the one a per-channel scale_N indexes by row.
Each matmul has three implementations that compute the same thing:
- 'xla': a `dot_general` (on CPU, in the forms XLA:CPU runs fastest), the rescale fused after
  it; the reference and the fallback.
- 'pallas': `pallas_tpu_matmul` (Mosaic: a (M, N, K) grid of int8 blocks, the accumulator in a
  VMEM scratch, the rescale fused into the last K step) on TPU, `pallas_gpu_matmul` (Triton: a
  (M, N) grid, each program looping over K blocks) on GPU. On CPU either runs with
  `interpret=True`, which is how the tests check them against 'xla'.
- 'auto': the backend's Pallas kernel on TPU and GPU, XLA anywhere else.

The kernels pad M, N and K up to whole blocks (zero columns of K add nothing to a dot) and
slice the result, so any shape runs.
"""
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

IMPLEMENTATIONS = ('auto', 'xla', 'pallas')
_PALLAS_BACKENDS = ('tpu', 'gpu')
_WEIGHT_ONLY_X_DTYPES = (jnp.float32, jnp.bfloat16)
# Past this many rows the multiply-reduce form of a weight-only matmul on XLA:CPU falls behind
# the dot (at K = N = 4096, M = 256: 3x slower; up to 128 it matches the f32 dot).
_MULTIPLY_REDUCE_MAX_M = 128

# Per backend, the largest (block_m, block_n, block_k); each shrinks to fit small operands.
# TPU: the x, w and output blocks double-buffered plus the int32 accumulator take ~3 MB of VMEM
# (f32 output), well inside the 16 MB a kernel gets by default on v5e.
_TPU_BLOCKS = (256, 512, 1024)
# GPU: Triton's usual int8 tiles; block_k >= 32 is what an int8 mma instruction consumes.
_GPU_BLOCKS = (64, 128, 128)


def int8_matmul(x_MK: jax.Array, w_NK: jax.Array, x_scale_M1: jax.Array, w_scale_N: jax.Array, *,
                out_dtype=jnp.float32, implementation: str = 'auto',
                interpret: bool = False) -> jax.Array:
  """W8A8: int8 x_MK times int8 w_NK (weights stored [N, K], contracting both last dims) with an
  exact int32 accumulator, then rescaled: acc_MN * x_scale_M1 * w_scale_N. x_scale_M1 is float32
  [M, 1] (per token) or [1, 1] (per tensor); w_scale_N float32 [N] (per channel) or [1] (per
  tensor).

  Returns [M, N] in out_dtype. `interpret` runs the Pallas kernel in interpret mode (on CPU, the
  TPU kernel).
  """
  _check_operands(x_MK, w_NK, x_dtypes=(jnp.int8,))
  _check_scales(x_MK, w_NK, x_scale_M1, w_scale_N)
  return _select(implementation, interpret)(x_MK, w_NK, x_scale_M1, w_scale_N,
                                            out_dtype=jnp.dtype(out_dtype))


def int8_weight_matmul(x_MK: jax.Array, w_NK: jax.Array, w_scale_N: jax.Array, *, out_dtype=None,
                       implementation: str = 'auto', interpret: bool = False) -> jax.Array:
  """W8A16 (weight-only): float x_MK (f32 or bf16) times int8 w_NK converted to x's dtype,
  accumulated in f32, times w_scale_N; out_dtype defaults to x's dtype.

  int8 values convert to bf16 exactly, so only the activations' rounding differs from an f32
  matmul against the dequantized weights.
  """
  _check_operands(x_MK, w_NK, x_dtypes=_WEIGHT_ONLY_X_DTYPES)
  _check_scales(x_MK, w_NK, None, w_scale_N)
  out_dtype = x_MK.dtype if out_dtype is None else jnp.dtype(out_dtype)
  return _select(implementation, interpret)(x_MK, w_NK, None, w_scale_N, out_dtype=out_dtype)


def int8_matmul_int32(x_MK: jax.Array, w_NK: jax.Array, *, implementation: str = 'auto',
                      interpret: bool = False) -> jax.Array:
  """The int32 accumulator of int8_matmul alone, [M, N]: what the tests compare exactly."""
  _check_operands(x_MK, w_NK, x_dtypes=(jnp.int8,))
  return _select(implementation, interpret)(x_MK, w_NK, None, None, out_dtype=jnp.dtype(jnp.int32))


@functools.partial(jax.jit, static_argnames=('out_dtype',))
def xla_matmul(x_MK, w_NK, x_scale_M1=None, w_scale_N=None, *, out_dtype):
  """The XLA reference: one product over the whole operands, then the rescale (fused by XLA).

  int8 x gives the exact int32 accumulator, float x an f32 one against w converted to x's dtype;
  the scales that are given (None: left out) multiply it in f32 before the cast to out_dtype.
  """
  dot = _cpu_dot_nt if jax.default_backend() == 'cpu' else _dot_nt
  return _rescale(dot(x_MK, w_NK), (x_scale_M1, w_scale_N), out_dtype)


def _cpu_dot_nt(x_MK, w_NK):
  """_dot_nt in the forms XLA:CPU runs fastest (docs/benchmarks.md, "int8 matmul on XLA:CPU").

  One row runs as two: XLA:CPU's int8 dot and its fused multiply-reduce are ~8x slower at M = 1
  than at M = 2. Weight-only products run in f32 (bf16 x int8 products are exact in it, and
  XLA:CPU's bf16 dots are slower): as a multiply-reduce up to _MULTIPLY_REDUCE_MAX_M rows, which
  reads the int8 weights inside the fusion, where a dot would first write them out converted
  (4x the bytes, which costs more than the dot at K = N = 4096).
  """
  M = x_MK.shape[0]
  if M == 1:
    return _cpu_dot_nt(jnp.pad(x_MK, ((0, 1), (0, 0))), w_NK)[:1]
  if x_MK.dtype == jnp.int8:
    return _dot_nt(x_MK, w_NK)
  x_MK = x_MK.astype(jnp.float32)
  if M > _MULTIPLY_REDUCE_MAX_M:
    return _dot_nt(x_MK, w_NK)
  return jnp.sum(x_MK[:, None, :] * w_NK.astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnames=('out_dtype', 'interpret', 'blocks'))
def pallas_tpu_matmul(x_MK, w_NK, x_scale_M1=None, w_scale_N=None, *, out_dtype,
                      interpret: bool = False, blocks: tuple[int, int, int] = _TPU_BLOCKS):
  """xla_matmul as a Mosaic TPU kernel over a (M, N, K) grid of blocks of at most `blocks`.

  The accumulator lives in a VMEM scratch across the K steps (the innermost, sequential grid
  axis), zeroed at the first and rescaled into the output block at the last, so the int32 sums
  never reach HBM. Blocks are whole (sublane, 128-lane) tiles: 32 rows for int8 (packed 4 to a
  32-bit sublane), 16 for bf16, 8 for f32.
  """
  sublanes = 32 // min(x_MK.dtype.itemsize, jnp.dtype(out_dtype).itemsize)
  bm, bn, bk = _fit(x_MK, w_NK, blocks, min_blocks=(sublanes, 128, 128))
  operands, grid = _padded(x_MK, w_NK, x_scale_M1, w_scale_N, bm, bn, bk)
  specs = [pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
           pl.BlockSpec((bn, bk), lambda i, j, k: (j, k)),
           pl.BlockSpec((bm, 1), lambda i, j, k: (i, 0)),
           pl.BlockSpec((1, bn), lambda i, j, k: (0, j))]
  out_MN = pl.pallas_call(
      functools.partial(_tpu_kernel, scaled=(x_scale_M1 is not None, w_scale_N is not None)),
      out_shape=jax.ShapeDtypeStruct((grid[0] * bm, grid[1] * bn), out_dtype),
      grid=grid,
      in_specs=_given(specs, operands),
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), _acc_dtype(x_MK.dtype))],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=pltpu.InterpretParams() if interpret else False,
      name='int8_matmul_tpu',
  )(*_given(operands, operands))
  return out_MN[:x_MK.shape[0], :w_NK.shape[0]]


def _tpu_kernel(x_ref, w_ref, *refs, scaled: tuple[bool, bool]):
  *scale_refs, out_ref, acc_ref = refs
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += _dot_nt(x_ref[...], w_ref[...])

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    out_ref[...] = _rescale(acc_ref[...], _read(scale_refs, scaled), out_ref.dtype)


@functools.partial(jax.jit, static_argnames=('out_dtype', 'interpret', 'blocks'))
def pallas_gpu_matmul(x_MK, w_NK, x_scale_M1=None, w_scale_N=None, *, out_dtype,
                      interpret: bool = False, blocks: tuple[int, int, int] = _GPU_BLOCKS):
  """xla_matmul as a Triton kernel: a (M, N) grid of programs, each looping over K in blocks.

  The accumulator stays in registers across the loop and is rescaled once before the store.
  Triton wants power-of-two blocks of at least 16 (32 along K, an int8 mma's depth).
  """
  bm, bn, bk = _fit(x_MK, w_NK, blocks, min_blocks=(16, 16, 32), power_of_two=True)
  operands, (grid_m, grid_n, grid_k) = _padded(x_MK, w_NK, x_scale_M1, w_scale_N, bm, bn, bk)
  K = grid_k * bk
  specs = [pl.BlockSpec((bm, K), lambda i, j: (i, 0)),
           pl.BlockSpec((bn, K), lambda i, j: (j, 0)),
           pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
           pl.BlockSpec((1, bn), lambda i, j: (0, j))]
  out_MN = pl.pallas_call(
      functools.partial(_gpu_kernel, scaled=(x_scale_M1 is not None, w_scale_N is not None),
                        block_k=bk),
      out_shape=jax.ShapeDtypeStruct((grid_m * bm, grid_n * bn), out_dtype),
      grid=(grid_m, grid_n),
      in_specs=_given(specs, operands),
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),
      interpret=interpret,
      name='int8_matmul_gpu',
  )(*_given(operands, operands))
  return out_MN[:x_MK.shape[0], :w_NK.shape[0]]


def _gpu_kernel(x_ref, w_ref, *refs, scaled: tuple[bool, bool], block_k: int):
  *scale_refs, out_ref = refs

  def accumulate(k, acc_mn):
    columns = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
    return acc_mn + _dot_nt(x_ref[:, columns], w_ref[:, columns])

  acc_mn = jnp.zeros((x_ref.shape[0], w_ref.shape[0]), _acc_dtype(x_ref.dtype))
  acc_mn = lax.fori_loop(0, x_ref.shape[1] // block_k, accumulate, acc_mn)
  out_ref[...] = _rescale(acc_mn, _read(scale_refs, scaled), out_ref.dtype)


def _acc_dtype(x_dtype):
  """int8 x int8 sums exactly in int32; float x (against w converted to it) sums in f32."""
  return jnp.int32 if x_dtype == jnp.int8 else jnp.float32


def _dot_nt(x_mk, w_nk):
  """x_mk @ w_nk.T, w converted to x's dtype, into the accumulator dtype."""
  return lax.dot_general(x_mk, w_nk.astype(x_mk.dtype), (((1,), (1,)), ((), ())),
                         preferred_element_type=_acc_dtype(x_mk.dtype))


def _rescale(acc_mn, scales, out_dtype):
  """acc_mn times each scale that is not None ([m, 1], [1, n] or [n]), in f32, cast to out_dtype."""
  scales = [scale for scale in scales if scale is not None]
  if scales:
    acc_mn = acc_mn.astype(jnp.float32)
  for scale in scales:
    acc_mn = acc_mn * scale
  return acc_mn.astype(out_dtype)


def _read(scale_refs, scaled):
  """The (x_scale_m1, w_scale_1n) blocks, None where that scale is not given."""
  blocks = iter(ref[...] for ref in scale_refs)
  return tuple(next(blocks) if given else None for given in scaled)


def _given(items, operands):
  """The items (specs or operands) at the positions of the operands that are not None."""
  return [item for item, operand in zip(items, operands) if operand is not None]


def _fit(x_MK, w_NK, blocks, *, min_blocks, power_of_two=False):
  """Block sizes: the largest `blocks`, shrunk to the (rounded-up) operand dims for small ones."""
  def fit(dim, block, minimum):
    need = pl.next_power_of_2(dim) if power_of_two else _round_up(dim, minimum)
    return max(minimum, min(block, need))
  (M, K), N = x_MK.shape, w_NK.shape[0]
  return tuple(fit(*args) for args in zip((M, N, K), blocks, min_blocks))


def _padded(x_MK, w_NK, x_scale_M1, w_scale_N, bm, bn, bk):
  """The operands zero-padded to whole blocks (scales as [M, 1] and [1, N]; None stays None), and
  the grid: the numbers of (M, N, K) blocks."""
  (M, K), N = x_MK.shape, w_NK.shape[0]
  Mp, Np, Kp = _round_up(M, bm), _round_up(N, bn), _round_up(K, bk)
  pad = lambda a, shape: jnp.pad(a, [(0, want - have) for want, have in zip(shape, a.shape)])
  operands = [pad(x_MK, (Mp, Kp)), pad(w_NK, (Np, Kp)), None, None]
  if x_scale_M1 is not None:
    operands[2] = pad(jnp.broadcast_to(x_scale_M1, (M, 1)), (Mp, 1))
  if w_scale_N is not None:
    operands[3] = pad(jnp.broadcast_to(w_scale_N, (N,)), (Np,))[None, :]
  return operands, (Mp // bm, Np // bn, Kp // bk)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _select(implementation: str, interpret: bool):
  """The function that `implementation` means on this backend."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation={implementation!r}: expected one of {IMPLEMENTATIONS}.')
  backend = jax.default_backend()
  if implementation == 'xla' or (implementation == 'auto' and backend not in _PALLAS_BACKENDS):
    return xla_matmul
  if backend == 'gpu':
    kernel = pallas_gpu_matmul
  elif backend == 'tpu' or interpret:
    kernel = pallas_tpu_matmul
  else:
    raise ValueError(f"implementation='pallas': there is no Pallas backend for {backend}; pass "
                     "interpret=True (tests) or use implementation='xla'.")
  return functools.partial(kernel, interpret=interpret)


def _check_operands(x_MK, w_NK, *, x_dtypes):
  names = ' or '.join(jnp.dtype(dtype).name for dtype in x_dtypes)
  if x_MK.ndim != 2 or x_MK.dtype not in x_dtypes:
    raise ValueError(f'x_MK must be {names} [M, K]; got {x_MK.dtype} {x_MK.shape}.')
  if w_NK.ndim != 2 or w_NK.dtype != jnp.int8:
    raise ValueError(f'w_NK must be int8 [N, K]; got {w_NK.dtype} {w_NK.shape}.')
  if x_MK.shape[1] != w_NK.shape[1]:
    raise ValueError(f'K mismatch: x_MK {x_MK.shape} and w_NK {w_NK.shape} must share their last '
                     'dim (weights are stored [N, K]).')


def _check_scales(x_MK, w_NK, x_scale_M1, w_scale_N):
  M, N = x_MK.shape[0], w_NK.shape[0]
  for name, scale, shapes in (('x_scale_M1', x_scale_M1, ((M, 1), (1, 1))),
                              ('w_scale_N', w_scale_N, ((N,), (1,)))):
    if scale is not None and (scale.shape not in shapes or scale.dtype != jnp.float32):
      raise ValueError(f'{name} must be float32 of shape {shapes[0]} or {shapes[1]} (for x_MK '
                       f'{x_MK.shape}, w_NK {w_NK.shape}); got {scale.dtype} {scale.shape}.')
