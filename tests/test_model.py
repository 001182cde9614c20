"""The Transformer does what its config says: shapes, masking, switches, numerics vs references."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import config_lib, tree
from lepton_jax.model import ModelConfig, Transformer, layers
from lepton_jax.model.attention import causal_mask, rope, xla_attention
from lepton_jax.model.transformer import Mlp
from tests.conftest import tiny_config

VOCAB, D_MODEL, HEADS, HEAD_DIM, D_FF, MAX_LEN = 64, 32, 4, 8, 64, 16
B, T = 2, 12
TOY = dict(vocab_size=VOCAB, d_model=D_MODEL, num_layers=2, num_heads=HEADS, num_kv_heads=HEADS,
           head_dim=HEAD_DIM, d_ff=D_FF, max_seq_len=MAX_LEN)


def toy_experiment(**model_overrides):
  """The shared tiny experiment with this file's toy model; keywords override model fields."""
  return tiny_config(seq_len=T, **{f'model.{k}': v for k, v in {**TOY, **model_overrides}.items()})


def model_config(**overrides) -> ModelConfig:
  return ModelConfig.from_config(toy_experiment(**overrides).model)


def tokens(seed: int = 0) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (B, T), 0, VOCAB)


def init_boxed(cfg: ModelConfig, seed: int = 0):
  """Params as `init` returns them: every leaf boxed with its logical axis names."""
  return Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, T), jnp.int32))['params']


def init(cfg: ModelConfig, seed: int = 0):
  return nn.unbox(init_boxed(cfg, seed))


def param_shapes(cfg: ModelConfig):
  """The param tree as ShapeDtypeStructs, boxes removed: structure checks need no compute."""
  return nn.unbox(jax.eval_shape(lambda: init_boxed(cfg)))


@functools.partial(jax.jit, static_argnums=0, static_argnames='deterministic')
def apply(cfg: ModelConfig, params, tokens_BT, deterministic=True, rngs=None) -> jax.Array:
  return Transformer(cfg).apply({'params': params}, tokens_BT, deterministic=deterministic,
                                rngs=rngs)


def paths(params) -> set[str]:
  """'a/b/c' for every leaf of a nested dict."""
  return set(tree.names(params))


def stack_layers(params, num_layers: int):
  """Unscanned params (layers_0, layers_1, ...) -> the scanned tree: 'layers', stacked on axis 0."""
  params = dict(params)
  per_layer = [params.pop(f'layers_{i}') for i in range(num_layers)]
  params['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  return params


def assert_close(actual, expected, tol):
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                             rtol=tol, atol=tol)


# --- shapes, dtypes, logical axes -----------------------------------------------------------

def test_default_config_gives_float32_logits_of_shape_batch_time_vocab():
  cfg = model_config()
  logits = apply(cfg, init(cfg), tokens())
  assert logits.shape == (B, T, VOCAB)
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize('scan_layers', [False, True])
def test_every_param_carries_logical_axis_names_known_to_the_rules(scan_layers):
  # Every kind of parameter at once: biases, qk-norm, layernorm, learned positions, the head.
  cfg = model_config(scan_layers=scan_layers, qkv_bias=True, out_bias=True, mlp_bias=True,
                     qk_norm=True, norm='layernorm', positions='learned', num_kv_heads=2)
  boxed = jax.eval_shape(lambda: init_boxed(cfg))
  specs = nn.get_partition_spec(boxed)
  arrays = nn.unbox(boxed)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  known = {name for name, _ in config_lib.DEFAULT_RULES} | {None}
  flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
  flat_arrays = jax.tree.leaves(arrays)
  assert len(flat_specs) == len(flat_arrays)
  for (path, spec), array in zip(flat_specs, flat_arrays):
    name = jax.tree_util.keystr(path)
    assert is_spec(spec) and len(spec) == array.ndim, f'{name}: {spec} for shape {array.shape}'
    assert set(spec) <= known, f'{name}: {spec} has axis names the sharding rules do not know'

  layer = lambda spec: ('layers', *spec) if scan_layers else spec
  blk = specs['layers'] if scan_layers else specs['layers_0']
  assert tuple(blk['attn']['query']['kernel']) == layer(('embed', 'heads', 'head_dim'))
  assert tuple(blk['attn']['key']['kernel']) == layer(('embed', 'kv_heads', 'head_dim'))
  assert tuple(blk['attn']['out']['kernel']) == layer(('heads', 'head_dim', 'embed'))
  assert tuple(blk['mlp']['up']['kernel']) == layer(('embed', 'mlp'))
  assert tuple(blk['mlp']['down']['kernel']) == layer(('mlp', 'embed'))
  assert tuple(specs['embed']['embedding']) == ('vocab', 'embed')
  assert tuple(specs['head']['kernel']) == ('embed', 'vocab')


# --- causal masking ---------------------------------------------------------------------------

@pytest.mark.parametrize('attention', ['xla', 'dot_product'])
@pytest.mark.parametrize('positions,sliding_window',
                         [('rope', 0), ('learned', 0), ('none', 0), ('rope', 4)])
def test_future_tokens_never_change_past_logits(attention, positions, sliding_window):
  cfg = model_config(attention=attention, positions=positions, sliding_window=sliding_window)
  params = init(cfg)
  tokens_BT = tokens(0)
  logits = apply(cfg, params, tokens_BT)
  for t in (0, 5, T - 2):
    future = tokens(t + 1)
    changed_BT = tokens_BT.at[:, t + 1:].set(future[:, t + 1:])
    changed = apply(cfg, params, changed_BT)
    assert_close(changed[:, :t + 1], logits[:, :t + 1], 1e-6)
    assert not np.allclose(changed[:, t + 1:], logits[:, t + 1:], atol=1e-3), 'inputs had no effect'


@pytest.mark.parametrize('attention', ['xla', 'dot_product'])
def test_sliding_window_sees_exactly_the_last_window_positions(attention):
  window, t = 4, 10
  # One layer, so the receptive field is exactly the window.
  cfg = model_config(attention=attention, sliding_window=window, num_layers=1)
  params = init(cfg)
  tokens_BT = tokens(0)
  logits_t = apply(cfg, params, tokens_BT)[:, t]

  def logits_t_with_token_changed_at(s):
    changed_BT = tokens_BT.at[:, s].set((tokens_BT[:, s] + 1) % VOCAB)
    return apply(cfg, params, changed_BT)[:, t]

  assert_close(logits_t_with_token_changed_at(t - window), logits_t, 1e-6)
  for s in range(t - window + 1, t + 1):
    assert not np.allclose(logits_t_with_token_changed_at(s), logits_t, atol=1e-4), s


def test_causal_mask_with_window():
  expected = np.array([[1, 0, 0, 0],
                       [1, 1, 0, 0],
                       [0, 1, 1, 0],
                       [0, 0, 1, 1]], bool)
  np.testing.assert_array_equal(causal_mask(4, 4, sliding_window=2), expected)
  lower = np.tril(np.ones((4, 4), bool))
  np.testing.assert_array_equal(causal_mask(4, 4, sliding_window=0), lower)
  np.testing.assert_array_equal(causal_mask(2, 4, sliding_window=0), lower[2:])  # last 2 queries


# --- each switch does what it says ------------------------------------------------------------

@pytest.mark.parametrize('mlp', ['swiglu', 'geglu', 'gelu', 'relu'])
def test_mlp_matches_its_formula_and_only_gated_ones_have_a_gate(mlp):
  cfg = model_config(mlp=mlp)
  x = np.asarray(jax.random.normal(jax.random.key(1), (B, T, D_MODEL)))
  params = nn.unbox(Mlp(cfg).init(jax.random.key(0), x, deterministic=True)['params'])
  gated = mlp in ('swiglu', 'geglu')
  assert set(params) == ({'up', 'gate', 'down'} if gated else {'up', 'down'})

  gelu_tanh = lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
  act = {'swiglu': lambda z: z / (1 + np.exp(-z)), 'geglu': gelu_tanh, 'gelu': gelu_tanh,
         'relu': lambda z: np.maximum(z, 0)}[mlp]
  w = {name: np.asarray(p['kernel']) for name, p in params.items()}
  hidden = act(x @ w['gate']) * (x @ w['up']) if gated else act(x @ w['up'])
  assert_close(Mlp(cfg).apply({'params': params}, x, deterministic=True), hidden @ w['down'], 1e-5)


def test_rmsnorm_has_only_a_scale_and_layernorm_also_a_bias():
  norm_params = lambda norm: param_shapes(model_config(norm=norm))['layers_0']['attn_norm']
  assert set(norm_params('rmsnorm')) == {'scale'}
  assert set(norm_params('layernorm')) == {'scale', 'bias'}
  assert set(param_shapes(model_config(norm='layernorm'))['final_norm']) == {'scale', 'bias'}


def test_no_biases_by_default():
  assert not [p for p in paths(param_shapes(model_config())) if p.endswith('bias')]


@pytest.mark.parametrize('switch,biased', [
    ('qkv_bias', {'attn/query', 'attn/key', 'attn/value'}),
    ('out_bias', {'attn/out'}),
    ('mlp_bias', {'mlp/up', 'mlp/gate', 'mlp/down'}),
])
def test_bias_switches_add_biases_exactly_where_they_say(switch, biased):
  params = param_shapes(model_config(num_kv_heads=2, **{switch: True}))
  for i in range(2):
    layer_paths = paths(params[f'layers_{i}'])
    assert {p.removesuffix('/bias') for p in layer_paths if p.endswith('/bias')} == biased
  attn = params['layers_0']['attn']
  if switch == 'qkv_bias':
    assert attn['query']['bias'].shape == (HEADS, HEAD_DIM)
    assert attn['key']['bias'].shape == (2, HEAD_DIM)
  if switch == 'out_bias':
    assert attn['out']['bias'].shape == (D_MODEL,)


def test_tied_embeddings_drop_the_head_and_project_with_the_embedding_table():
  untied_cfg, tied_cfg = model_config(), model_config(tie_embeddings=True)
  assert 'head' in param_shapes(untied_cfg)
  assert 'head' not in param_shapes(tied_cfg)
  # The tied model is the untied one with head kernel = embedding^T.
  params = init(untied_cfg)
  params['head'] = {'kernel': params['embed']['embedding'].T}
  tied_params = {k: v for k, v in params.items() if k != 'head'}
  assert_close(apply(tied_cfg, tied_params, tokens()), apply(untied_cfg, params, tokens()), 1e-5)


def test_qk_norm_adds_query_and_key_norms_over_head_dim():
  assert 'query_norm' not in param_shapes(model_config())['layers_0']['attn']
  attn = param_shapes(model_config(qk_norm=True))['layers_0']['attn']
  assert attn['query_norm']['scale'].shape == (HEAD_DIM,)
  assert attn['key_norm']['scale'].shape == (HEAD_DIM,)


@pytest.mark.parametrize('num_kv_heads', [4, 2, 1])  # MHA, GQA, MQA
def test_key_and_value_kernels_have_num_kv_heads(num_kv_heads):
  cfg = model_config(num_kv_heads=num_kv_heads)
  attn = param_shapes(cfg)['layers_0']['attn']
  assert attn['query']['kernel'].shape == (D_MODEL, HEADS, HEAD_DIM)
  assert attn['key']['kernel'].shape == (D_MODEL, num_kv_heads, HEAD_DIM)
  assert attn['value']['kernel'].shape == (D_MODEL, num_kv_heads, HEAD_DIM)


def test_learned_positions_add_a_position_table_of_max_seq_len_rows():
  params = param_shapes(model_config(positions='learned'))
  assert params['pos_embedding'].shape == (MAX_LEN, D_MODEL)
  assert 'pos_embedding' not in param_shapes(model_config(positions='rope'))
  assert 'pos_embedding' not in param_shapes(model_config(positions='none'))


def test_dropout_is_off_when_deterministic_and_on_otherwise():
  cfg = model_config(dropout=0.5)
  params, tokens_BT = init(cfg), tokens()
  eval1 = apply(cfg, params, tokens_BT, deterministic=True)
  eval2 = apply(cfg, params, tokens_BT, deterministic=True)
  no_dropout = apply(model_config(), params, tokens_BT)
  np.testing.assert_array_equal(eval1, eval2)
  assert_close(eval1, no_dropout, 1e-6)
  train = lambda seed: apply(cfg, params, tokens_BT, deterministic=False,
                             rngs={'dropout': jax.random.key(seed)})
  assert not np.allclose(train(0), eval1, atol=1e-3)
  assert not np.allclose(train(0), train(1), atol=1e-3)
  np.testing.assert_array_equal(train(0), train(0))


def test_scanned_layers_equal_unrolled_layers_with_restacked_params():
  cfg, scan_cfg = model_config(), model_config(scan_layers=True)
  params = init(cfg)
  stacked = stack_layers(params, cfg.num_layers)
  shape = lambda a: a.shape
  assert jax.tree.map(shape, stacked) == jax.tree.map(shape, param_shapes(scan_cfg))
  assert_close(apply(scan_cfg, stacked, tokens()), apply(cfg, params, tokens()), 1e-5)


def test_scanned_layers_pass_every_collection_through_stacked_on_the_layer_axis():
  # Intermediates stand for any collection besides params (a KV cache, LoRA): nn.scan drops
  # the collections it is not told to lift, silently.
  cfg, scan_cfg = model_config(), model_config(scan_layers=True)
  params = init(cfg)
  intermediates = lambda cfg, params: Transformer(cfg).apply(
      {'params': params}, tokens(), capture_intermediates=True)[1]['intermediates']
  scanned = intermediates(scan_cfg, stack_layers(params, cfg.num_layers))
  expected = stack_layers(intermediates(cfg, params), cfg.num_layers)
  assert jax.tree.structure(scanned) == jax.tree.structure(expected)
  assert scanned['layers']['mlp']['__call__'][0].shape == (cfg.num_layers, B, T, D_MODEL)
  jax.tree.map(lambda a, b: assert_close(a, b, 1e-5), scanned, expected)


@functools.cache
def _loss_and_grads(remat: str, scan_layers: bool):
  """Cross-entropy and its gradients for the same params and tokens under a remat policy."""
  cfg = model_config(remat=remat, scan_layers=scan_layers)
  params = init(model_config())
  if scan_layers:
    params = stack_layers(params, cfg.num_layers)
  tokens_BT = tokens()

  def loss(params):
    logits = apply(cfg, params, tokens_BT)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, tokens_BT[..., None], -1)[..., 0])
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize('remat,scan_layers', [('full', False), ('dots', False),
                                               ('dots_no_batch', False), ('dots', True)])
def test_remat_changes_neither_loss_nor_gradients(remat, scan_layers):
  loss, grads = _loss_and_grads('none', scan_layers)
  remat_loss, remat_grads = _loss_and_grads(remat, scan_layers)
  assert_close(remat_loss, loss, 1e-6)
  jax.tree.map(lambda a, b: assert_close(a, b, 1e-6), remat_grads, grads)
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


def test_bfloat16_compute_is_close_to_float32_and_params_stay_in_param_dtype():
  f32_cfg = model_config()
  params = init(f32_cfg)
  bf16_cfg = model_config(dtype='bfloat16')
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(param_shapes(bf16_cfg)))
  f32_logits = apply(f32_cfg, params, tokens())
  bf16_logits = apply(bf16_cfg, params, tokens())
  assert bf16_logits.dtype == jnp.float32  # Logits are always returned in f32 for the loss.
  assert not np.array_equal(bf16_logits, f32_logits)  # The compute really ran in bf16.
  assert_close(bf16_logits, f32_logits, 5e-2)

  all_bf16 = model_config(dtype='bfloat16', param_dtype='bfloat16')
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(param_shapes(all_bf16)))
  assert apply(all_bf16, init(all_bf16), tokens()).dtype == jnp.float32


# --- numerics vs independent references -------------------------------------------------------

def test_layer_fields_after_the_first_are_keyword_only():
  # So that dtype and param_dtype (or in_axes and out_axes) can never be swapped by position.
  with pytest.raises(TypeError):
    layers.Dense((D_FF,), ('embed',), ('mlp',))
  with pytest.raises(TypeError):
    layers.Norm(1e-5, True)
  with pytest.raises(TypeError):
    layers.Embed(VOCAB, D_MODEL)


def _norm_inputs():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(B, T, D_MODEL)).astype(np.float32) * 3 + 1,
          rng.normal(size=D_MODEL).astype(np.float32), rng.normal(size=D_MODEL).astype(np.float32))


def test_rmsnorm_matches_formula():
  x, scale, _ = _norm_inputs()
  out = layers.Norm(eps=1e-5).apply({'params': {'scale': scale}}, x)
  expected = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-5) * scale
  assert_close(out, expected, 1e-5)


def test_layernorm_matches_formula():
  x, scale, bias = _norm_inputs()
  out = layers.Norm(eps=1e-5, center=True).apply({'params': {'scale': scale, 'bias': bias}}, x)
  centered = x - x.mean(-1, keepdims=True)
  expected = centered / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * scale + bias
  assert_close(out, expected, 1e-5)


def test_rope_is_a_complex_rotation_of_pairs_i_and_i_plus_half():
  theta, rng = 10_000.0, np.random.default_rng(0)
  x = rng.normal(size=(B, T, HEADS, HEAD_DIM)).astype(np.float32)
  positions = np.stack([np.arange(T), np.arange(T) + 5])
  half = HEAD_DIM // 2
  freqs = theta ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)  # HF Llama's inv_freq
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * positions[:, :, None, None] * freqs)
  expected = np.concatenate([z.real, z.imag], -1)
  assert_close(rope(jnp.asarray(x), jnp.asarray(positions), freqs), expected, 1e-5)


_FREQS = 10_000.0 ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)


def test_rope_at_position_zero_is_identity():
  x = jax.random.normal(jax.random.key(0), (B, T, HEADS, HEAD_DIM))
  assert_close(rope(x, jnp.zeros((B, T), jnp.int32), _FREQS), x, 1e-7)


def test_rope_scores_depend_only_on_position_difference():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, HEAD_DIM))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, HEAD_DIM))
  score = lambda m, n: float(jnp.sum(rope(q, jnp.array([[m]]), _FREQS) *
                                     rope(k, jnp.array([[n]]), _FREQS)))
  for shift in (1, 7, 100):
    assert score(5 + shift, 2 + shift) == pytest.approx(score(5, 2), abs=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def _naive_attention(q, k, v, window):
  """Loops over batch, query head and query position; query head n reads kv head n // group."""
  B_, T_, N, H = q.shape
  group = N // k.shape[2]
  out = np.zeros_like(q)
  for b in range(B_):
    for n in range(N):
      for t in range(T_):
        visible = [s for s in range(T_) if s <= t and (not window or s > t - window)]
        scores = np.array([q[b, t, n] @ k[b, s, n // group] for s in visible]) / np.sqrt(H)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        out[b, t, n] = sum(p * v[b, s, n // group] for p, s in zip(probs, visible))
  return out


@pytest.mark.parametrize('num_kv_heads,window', [(4, 0), (2, 0), (1, 0), (2, 3)])
def test_xla_attention_matches_naive_reference_and_mha_with_repeated_kv(num_kv_heads, window):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(B, T, HEADS, HEAD_DIM)).astype(np.float32)
  k, v = (rng.normal(size=(B, T, num_kv_heads, HEAD_DIM)).astype(np.float32) for _ in range(2))
  mask = causal_mask(T, T, window)
  attend = lambda k, v: xla_attention(q, k, v, mask, nn.Dropout(0.0).bind({}), deterministic=True)
  out = attend(k, v)
  assert_close(out, _naive_attention(q, k, v, window), 1e-5)
  repeat = lambda x: np.repeat(x, HEADS // num_kv_heads, axis=2)  # HF repeat_kv
  assert_close(attend(repeat(k), repeat(v)), out, 1e-6)


@pytest.mark.parametrize('overrides', [dict(), dict(num_kv_heads=2, sliding_window=5),
                                       dict(num_kv_heads=1, qk_norm=True, qkv_bias=True)])
def test_xla_attention_equals_jax_dot_product_attention(overrides):
  xla_cfg = model_config(attention='xla', **overrides)
  params = init(xla_cfg)
  params = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.key(3), p.shape), params)
  dot_cfg = model_config(attention='dot_product', **overrides)
  assert_close(apply(dot_cfg, params, tokens()), apply(xla_cfg, params, tokens()), 1e-5)


# --- parity with a plain PyTorch implementation -----------------------------------------------

def _torch_forward(cfg: ModelConfig, params, tokens_BT):
  """GPT-2 / Llama forward in plain torch from our param tree (HF conventions: rotate_half rope,
  repeat_kv GQA, tanh gelu)."""
  import torch
  import torch.nn.functional as F
  p = jax.tree.map(lambda a: torch.tensor(np.asarray(a), dtype=torch.float32), params)
  x = torch.tensor(np.asarray(tokens_BT), dtype=torch.long)
  Bt, Tt = x.shape
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def norm(q, h):
    if cfg.norm == 'layernorm':
      return F.layer_norm(h, h.shape[-1:], q['scale'], q['bias'], cfg.norm_eps)
    return F.rms_norm(h, h.shape[-1:], q['scale'], cfg.norm_eps)

  def linear(q, h, n_in=1):
    w = q['kernel'].reshape(int(np.prod(q['kernel'].shape[:n_in])), -1)
    h = h.flatten(-n_in) @ w
    return h + q['bias'].flatten() if 'bias' in q else h

  def rotate_half(h):
    h1, h2 = h.chunk(2, dim=-1)
    return torch.cat((-h2, h1), dim=-1)

  inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, H, 2).float() / H)
  angles = torch.cat([torch.outer(torch.arange(Tt).float(), inv_freq)] * 2, dim=-1)
  cos, sin = angles.cos()[None, None], angles.sin()[None, None]

  h = F.embedding(x, p['embed']['embedding'])
  if cfg.positions == 'learned':
    h = h + p['pos_embedding'][:Tt]
  for i in range(cfg.num_layers):
    blk = p[f'layers_{i}']
    a = norm(blk['attn_norm'], h)
    q, k, v = (linear(blk['attn'][n], a).view(Bt, Tt, -1, H).transpose(1, 2)
               for n in ('query', 'key', 'value'))
    if cfg.positions == 'rope':
      q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = k.repeat_interleave(N // K, dim=1), v.repeat_interleave(N // K, dim=1)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    h = h + linear(blk['attn']['out'], attn, n_in=2)
    m, mlp = norm(blk['mlp_norm'], h), blk['mlp']
    if cfg.mlp == 'swiglu':
      m = F.silu(linear(mlp['gate'], m)) * linear(mlp['up'], m)
    else:
      m = F.gelu(linear(mlp['up'], m), approximate='tanh')
    h = h + linear(mlp['down'], m)
  h = norm(p['final_norm'], h)
  logits = h @ p['embed']['embedding'].T if cfg.tie_embeddings else linear(p['head'], h)
  return logits.numpy()


@pytest.mark.parametrize('style', ['gpt2', 'llama'])
def test_logits_match_a_plain_torch_implementation(style):
  pytest.importorskip('torch')
  if style == 'gpt2':
    cfg = model_config(norm='layernorm', positions='learned', mlp='gelu', qkv_bias=True,
                       out_bias=True, mlp_bias=True, tie_embeddings=True)
  else:
    cfg = model_config(num_kv_heads=2)
  params = init(cfg)
  # Perturb every param (zero biases and unit scales would hide layout mistakes).
  keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(params))))
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape), params)
  assert_close(apply(cfg, params, tokens()), _torch_forward(cfg, params, tokens()), 1e-4)


# --- config validation ------------------------------------------------------------------------

def test_toy_experiment_is_valid():
  config_lib.validate(toy_experiment())


@pytest.mark.parametrize('overrides,key', [
    (dict(num_heads=4, num_kv_heads=3), 'config.model.num_heads'),
    (dict(head_dim=7, positions='rope'), 'config.model.head_dim'),
    (dict(mlp='swish'), 'config.model.mlp'),
    (dict(max_seq_len=T - 1), 'config.model.max_seq_len'),
    (dict(dropout=0.1, attention='dot_product'), 'config.model.dropout'),
])
def test_validate_names_the_bad_key(overrides, key):
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    config_lib.validate(toy_experiment(**overrides))


def test_odd_head_dim_is_fine_without_rope():
  config_lib.validate(toy_experiment(head_dim=7, positions='learned'))
