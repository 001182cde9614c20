"""int8 matmul kernels: the TPU (Mosaic) and GPU (Triton) Pallas kernels run in interpret mode on
CPU against the XLA reference and numpy, lower for TPU and CUDA without a device, and bad inputs
fail with one line naming the argument."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax.kernels import int8_matmul as kernels

KERNELS = {'tpu': kernels.pallas_tpu_matmul, 'gpu': kernels.pallas_gpu_matmul}
# Blocks small enough that 64 x 256 x 256 spans several along M, N and K (the accumulator carries
# across K steps), and 5 x 100 x 33 needs padding along all three.
SMALL_BLOCKS = {'tpu': (32, 128, 128), 'gpu': (16, 32, 32)}
SHAPES = [(64, 256, 256), (5, 100, 33)]


def operands(M, K, N, seed=0):
  rng = np.random.default_rng(seed)
  x_MK = jnp.asarray(rng.integers(-128, 128, (M, K)), jnp.int8)
  w_NK = jnp.asarray(rng.integers(-128, 128, (N, K)), jnp.int8)
  x_scale_M1 = jnp.asarray(rng.uniform(1e-3, 1e-1, (M, 1)), jnp.float32)
  w_scale_N = jnp.asarray(rng.uniform(1e-3, 1e-1, (N,)), jnp.float32)
  return x_MK, w_NK, x_scale_M1, w_scale_N


def interpreted(backend, *args, **kwargs):
  return KERNELS[backend](*args, interpret=True, blocks=SMALL_BLOCKS[backend], **kwargs)


@pytest.mark.parametrize('backend', KERNELS)
@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_int32_accumulator_is_exact(backend, shape):
  x_MK, w_NK, _, _ = operands(*shape)
  acc_MN = interpreted(backend, x_MK, w_NK, out_dtype=jnp.int32)
  assert acc_MN.dtype == jnp.int32
  np.testing.assert_array_equal(acc_MN, np.asarray(x_MK, np.int64) @ np.asarray(w_NK, np.int64).T)
  np.testing.assert_array_equal(acc_MN, kernels.int8_matmul_int32(x_MK, w_NK, implementation='xla'))


@pytest.mark.parametrize('backend', KERNELS)
@pytest.mark.parametrize('per_tensor, out_dtype', [(False, jnp.float32), (True, jnp.bfloat16)],
                         ids=['per-token-f32', 'per-tensor-bf16'])
def test_rescaled_equals_xla(backend, per_tensor, out_dtype):
  x_MK, w_NK, x_scale_M1, w_scale_N = operands(*SHAPES[0])
  if per_tensor:
    x_scale_M1, w_scale_N = x_scale_M1[:1], w_scale_N[:1]
  out_MN = interpreted(backend, x_MK, w_NK, x_scale_M1, w_scale_N, out_dtype=out_dtype)
  expected_MN = kernels.int8_matmul(x_MK, w_NK, x_scale_M1, w_scale_N, out_dtype=out_dtype,
                                    implementation='xla')
  assert out_MN.dtype == expected_MN.dtype == out_dtype
  rtol = 1e-6 if out_dtype == jnp.float32 else 2 ** -8  # bf16: one rounding of the same f32.
  np.testing.assert_allclose(np.asarray(out_MN, np.float32), np.asarray(expected_MN, np.float32),
                             rtol=rtol)


def assert_close_to_dequantized(out_MN, x_MK, w_NK, w_scale_N, rtol):
  """out_MN against x @ (w * scale).T in f64, to rtol of each sum of |terms|: what summing the
  same products in another order, and rounding the result, can lose."""
  x_MK = np.asarray(x_MK, np.float64)
  w_NK = np.asarray(w_NK, np.float64) * np.asarray(w_scale_N, np.float64)[:, None]
  error_MN = np.abs(np.asarray(out_MN, np.float64) - x_MK @ w_NK.T)
  np.testing.assert_array_less(error_MN, rtol * (np.abs(x_MK) @ np.abs(w_NK).T))


@pytest.mark.parametrize('backend', KERNELS)
@pytest.mark.parametrize('x_dtype', [jnp.float32, jnp.bfloat16])
def test_weight_only_equals_dequantized_matmul(backend, x_dtype):
  _, w_NK, _, w_scale_N = operands(*SHAPES[0])
  x_MK = jax.random.normal(jax.random.key(0), (SHAPES[0][0], w_NK.shape[1])).astype(x_dtype)
  out_MN = interpreted(backend, x_MK, w_NK, None, w_scale_N, out_dtype=x_dtype)
  assert out_MN.dtype == x_dtype
  # int8 values are exact in bf16, and bf16 x int8 products exact in f32: what differs is the
  # order of K = 256 f32 additions (at most K * 2^-24 of the sum of |terms|), then bf16's rounding.
  rtol = 256 * 2 ** -24 if x_dtype == jnp.float32 else 2 ** -8
  assert_close_to_dequantized(out_MN, x_MK, w_NK, w_scale_N, rtol)
  xla_MN = kernels.int8_weight_matmul(x_MK, w_NK, w_scale_N, implementation='xla')
  assert_close_to_dequantized(xla_MN, x_MK, w_NK, w_scale_N, rtol)


def test_pallas_on_cpu_interprets_the_tpu_kernel_with_default_blocks():
  x_MK, w_NK, x_scale_M1, w_scale_N = operands(*SHAPES[1])
  out_MN = kernels.int8_matmul(x_MK, w_NK, x_scale_M1, w_scale_N, implementation='pallas',
                               interpret=True)
  np.testing.assert_allclose(out_MN, kernels.int8_matmul(x_MK, w_NK, x_scale_M1, w_scale_N,
                                                         implementation='xla'), rtol=1e-6)
  x_MK = x_MK.astype(jnp.float32) / 128
  out_MN = kernels.int8_weight_matmul(x_MK, w_NK, w_scale_N, implementation='pallas',
                                      interpret=True)
  assert_close_to_dequantized(out_MN, x_MK, w_NK, w_scale_N, rtol=100 * 2 ** -24)


@pytest.mark.parametrize('M', [1, 5, 200])  # 1: padded to 2 rows; 200: the dot, not the reduce.
def test_auto_on_cpu_is_xla(M):
  x_MK, w_NK, x_scale_M1, w_scale_N = operands(M, 100, 33)
  jaxpr = jax.make_jaxpr(kernels.int8_matmul)(x_MK, w_NK, x_scale_M1, w_scale_N)
  assert 'pallas_call' not in str(jaxpr)
  np.testing.assert_array_equal(
      jax.jit(kernels.int8_matmul)(x_MK, w_NK, x_scale_M1, w_scale_N),
      kernels.int8_matmul(x_MK, w_NK, x_scale_M1, w_scale_N, implementation='xla'))
  np.testing.assert_array_equal(kernels.int8_matmul_int32(x_MK, w_NK),
                                np.asarray(x_MK, np.int64) @ np.asarray(w_NK, np.int64).T)
  x_MK = x_MK.astype(jnp.bfloat16) / 128
  out_MN = kernels.int8_weight_matmul(x_MK, w_NK, w_scale_N)
  assert out_MN.dtype == jnp.bfloat16
  assert_close_to_dequantized(out_MN, x_MK, w_NK, w_scale_N, rtol=2 ** -8)


# The custom call each kernel lowers to. jaxlib <= 0.10.2 hands the Triton module to XLA
# (`__gpu$xla.gpu.triton`); later jaxlibs compile it at lowering (`triton_kernel_call_ffi`).
CUSTOM_CALLS = {'tpu': ('tpu', r'tpu_custom_call'),
                'gpu': ('cuda', r'__gpu\$xla\.gpu\.triton|triton_kernel_call_ffi')}


@pytest.mark.parametrize('backend', KERNELS)
@pytest.mark.parametrize('op', ['w8a8', 'weight_only', 'int32'])
def test_lowers_without_a_device(backend, op):
  x_MK, w_NK, x_scale_M1, w_scale_N = operands(*SHAPES[0])
  args = {'w8a8': (x_MK, w_NK, x_scale_M1, w_scale_N),
          'weight_only': (x_MK.astype(jnp.bfloat16), w_NK, None, w_scale_N),
          'int32': (x_MK, w_NK)}[op]
  out_dtype = jnp.int32 if op == 'int32' else jnp.bfloat16
  platform, custom_call = CUSTOM_CALLS[backend]
  lowered = jax.jit(lambda *a: KERNELS[backend](*a, out_dtype=out_dtype)).trace(*args).lower(
      lowering_platforms=(platform,))
  assert re.search(rf'stablehlo\.custom_call @({custom_call})\(', lowered.as_text())


M, K, N = 4, 16, 8
GOOD = dict(x_MK=jnp.zeros((M, K), jnp.int8), w_NK=jnp.zeros((N, K), jnp.int8),
            x_scale_M1=jnp.ones((M, 1)), w_scale_N=jnp.ones((N,)))


@pytest.mark.parametrize('bad, match', [
    (dict(x_MK=jnp.zeros((M, K))), r'x_MK must be int8 \[M, K\]; got float32 \(4, 16\)'),
    (dict(x_MK=jnp.zeros((K,), jnp.int8)), r'x_MK must be int8 \[M, K\]'),
    (dict(w_NK=jnp.zeros((N, K), jnp.int32)), r'w_NK must be int8 \[N, K\]; got int32'),
    (dict(w_NK=jnp.zeros((K, N), jnp.int8)), r'K mismatch: x_MK \(4, 16\) and w_NK \(16, 8\)'),
    (dict(x_scale_M1=jnp.ones((M,))), r'x_scale_M1 must be float32 of shape \(4, 1\) or \(1, 1\)'),
    (dict(x_scale_M1=jnp.ones((M, 1), jnp.bfloat16)), r'x_scale_M1 .* got bfloat16'),
    (dict(w_scale_N=jnp.ones((N, 1))), r'w_scale_N must be float32 of shape \(8,\) or \(1,\)'),
    (dict(implementation='triton'), r"implementation='triton': expected one of"),
    (dict(implementation='pallas'), r'no Pallas backend for cpu; pass interpret=True'),
], ids=lambda case: next(iter(case)) if isinstance(case, dict) else None)
def test_bad_inputs_fail_naming_the_argument(bad, match):
  with pytest.raises(ValueError, match=match):
    kernels.int8_matmul(**{**GOOD, **bad})


def test_bad_weight_only_and_int32_inputs():
  x_MK, w_NK, w_scale_N = GOOD['x_MK'], GOOD['w_NK'], GOOD['w_scale_N']
  with pytest.raises(ValueError, match=r'x_MK must be float32 or bfloat16 \[M, K\]; got int8'):
    kernels.int8_weight_matmul(x_MK, w_NK, w_scale_N)
  with pytest.raises(ValueError, match=r'w_scale_N must be float32 of shape \(8,\)'):
    kernels.int8_weight_matmul(x_MK.astype(jnp.float32), w_NK, w_scale_N[:3])
  with pytest.raises(ValueError, match=r'K mismatch'):
    kernels.int8_matmul_int32(x_MK, w_NK[:, :3])
  with pytest.raises(ValueError, match=r'implementation='):
    kernels.int8_matmul_int32(x_MK, w_NK, implementation='mosaic')
