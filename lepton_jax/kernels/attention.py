"""TPU attention kernels (Pallas, shipped with jax) for the full-sequence path, under the mesh.

config.model.attention='splash' picks the splash kernel (model/attention.py): block-sparse
flash attention, whose causal mask, or the local mask of a sliding window, skips the blocks it
masks whole; GQA without repeating k/v; segment ids. Memory stays linear in T: no
[heads, T, T] scores are materialised. jax's older TPU flash kernel is not offered: it does
nothing splash does not (no sliding window, k/v repeated for GQA), and it cannot be checked on
CPU (it takes no interpret argument, and `pltpu.force_tpu_interpret_mode` reaches only what is
traced inside it, not its backward kernels, traced later under jit or grad).

The kernel runs per device under `jax.shard_map` over the mesh axes that the logical rules give
the activations' 'batch' and 'act_heads' (data/fsdp and tensor), so it composes with FSDP and
tensor parallelism. Off TPU it runs in Pallas interpret mode, which is how the tests check them against
the XLA path on CPU: slow, for tests only.

The splash kernel's residuals (its output and logsumexp) are named RESIDUAL_NAME, so a remat
policy can save them (transformer.REMAT_POLICIES['dots_no_batch_attention']) or recompute them.
"""
import functools

import flax.linen as nn
import jax
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib
from jax.sharding import PartitionSpec as P

KERNELS = ('splash',)
# The kernel tiles the sequence in blocks of a multiple of this many tokens (TPU vector lanes).
LANES = 128
RESIDUAL_NAME = 'attention_context'


def target_platform() -> str:
  """The platform being traced for: the mesh's devices (a TPU topology when compiling ahead of
  time on a CPU host), else the default backend."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()


def splash_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                     segment_ids_BT: jax.Array | None, *, sliding_window: int, block_q: int,
                     block_kv: int) -> jax.Array:
  """Causal self-attention of q [B, T, N, H] over k, v [B, T, K, H] with the splash kernel.

  With segment ids a token attends only within its segment; sliding_window > 0 limits each
  query to the last sliding_window keys. Blocks are clamped to T, which must be a multiple of
  LANES. Returns [B, T, N, H].
  """
  T = q_BTNH.shape[1]
  if T % LANES:
    raise ValueError(f'splash attention needs a sequence length that is a multiple of {LANES}; '
                     f'got {T}')
  platform = target_platform()
  if platform not in ('tpu', 'cpu'):
    raise ValueError(f"config.model.attention='splash' is a TPU kernel; on {platform} use "
                     "'auto' or 'dot_product'")
  fn = functools.partial(_splash, sliding_window=sliding_window,
                         blocks=(min(block_q, T), min(block_kv, T)), interpret=platform != 'tpu')
  operands = (q_BTNH, k_BTKH, v_BTKH)
  if segment_ids_BT is None:
    fn = functools.partial(fn, segment_ids_BT=None)
  else:
    operands += (segment_ids_BT,)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*operands)
  batch, _, heads, _ = nn.logical_to_mesh_axes(('batch', 'length', 'act_heads', 'head_dim'))
  heads_spec = P(batch, None, heads, None)  # kv heads split as the query heads they serve.
  specs = (heads_spec,) * 3 + (P(batch, None),) * (len(operands) - 3)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=heads_spec,
                       check_vma=False)(*operands)


def _splash(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, sliding_window, blocks, interpret):
  B, T, N, H = q_BTNH.shape
  block_q, block_kv = blocks
  head_mask = (splash_lib.LocalMask((T, T), (sliding_window - 1, 0), offset=0) if sliding_window
               else splash_lib.CausalMask((T, T)))
  block_sizes = splash_lib.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
      block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q,
      block_kv_dq=block_kv)
  # Per device: these are the shard's heads, all of them in this kernel's grid.
  kernel = splash_lib.make_splash_mha(
      splash_lib.MultiHeadMask([head_mask] * N), block_sizes=block_sizes, head_shards=1,
      q_seq_shards=1, residual_checkpoint_name=RESIDUAL_NAME, interpret=interpret)
  # Heads first; a query head n = k * G + g uses kv head n // G, as the kernel indexes them.
  q_BNTH = (q_BTNH * H ** -0.5).transpose(0, 2, 1, 3)
  k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
  if segment_ids_BT is None:
    out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH)
  else:
    row = lambda q, k, v, ids_T: kernel(q, k, v, segment_ids=splash_lib.SegmentIds(ids_T, ids_T))
    out_BNTH = jax.vmap(row)(q_BNTH, k_BKTH, v_BKTH, segment_ids_BT)
  return out_BNTH.transpose(0, 2, 1, 3)

