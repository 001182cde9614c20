"""lepton_jax.interpret: hook names and shapes, hooks that edit, and the tools built on them,
each against a reference computed without hooks (weights edited by hand, the embedding table's
gradient, the model's own logits) or against a circuit built by hand."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import config_lib, interpret
from lepton_jax.model import ModelConfig, Transformer

# Llama-style (rope, swiglu, GQA 4/2) and GPT-2-style (learned positions, layernorm, gelu, biases,
# tied head): between them every kind of hook point.
VARIANTS = {
    'llama': dict(),
    'gpt2': dict(positions='learned', norm='layernorm', mlp='gelu', qkv_bias=True, out_bias=True,
                 mlp_bias=True, tie_embeddings=True, num_kv_heads=4),
}
B, T, V, L, N, K, H, D, F = 2, 10, 64, 2, 4, 2, 8, 32, 48


def model_config(variant='llama', scan=False, **overrides) -> ModelConfig:
  config = config_lib.model_config()
  config.update(vocab_size=V, d_model=D, num_layers=L, num_heads=N, num_kv_heads=K, head_dim=H,
                d_ff=F, max_seq_len=32, scan_layers=scan)
  config.update(**VARIANTS[variant], **overrides)
  return ModelConfig.from_config(config)


def tokens(seed=0, shape=(B, T)) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), shape, 0, V)


def init(cfg: ModelConfig, seed=0) -> dict:
  """Params with noticeably non-zero biases and norm scales, so that a hook point read before
  or after the wrong one cannot pass."""
  unscanned = Transformer(dataclasses.replace(cfg, scan_layers=False))  # stacked() scans them.
  params = nn.unbox(unscanned.init(jax.random.key(seed), tokens())['params'])
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  def perturb(path, leaf, key):
    name = jax.tree_util.keystr(path)
    if 'bias' in name or 'scale' in name:
      return leaf + 0.3 * jax.random.normal(key, leaf.shape)
    return leaf * 5.0 if 'kernel' in name or 'embedding' in name else leaf  # Peaked attention.
  return {'params': treedef.unflatten(
      [perturb(path, leaf, key) for (path, leaf), key in zip(leaves, keys)])}


def stacked(variables: dict) -> dict:
  """The same params laid out for scan_layers."""
  params = dict(variables['params'])
  per_layer = [params.pop(f'layers_{i}') for i in range(L)]
  return {'params': dict(params, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer))}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
  shapes = {'hook_embed': (B, T, D), 'ln_final.hook_normalized': (B, T, D),
            'unembed.hook_out': (B, T, V)}
  if cfg.positions == 'learned':
    shapes['hook_pos_embed'] = (B, T, D)
  for i in range(L):
    block = {'hook_resid_pre': (B, T, D), 'ln1.hook_normalized': (B, T, D),
             'attn.hook_q': (B, T, N, H), 'attn.hook_k': (B, T, cfg.num_kv_heads, H),
             'attn.hook_v': (B, T, cfg.num_kv_heads, H), 'attn.hook_attn_scores': (B, N, T, T),
             'attn.hook_pattern': (B, N, T, T), 'attn.hook_z': (B, T, N, H),
             'hook_attn_out': (B, T, D), 'hook_resid_mid': (B, T, D),
             'ln2.hook_normalized': (B, T, D), 'mlp.hook_pre': (B, T, F),
             'mlp.hook_post': (B, T, F), 'hook_mlp_out': (B, T, D), 'hook_resid_post': (B, T, D)}
    if cfg.positions == 'rope':
      block.update({'attn.hook_rot_q': (B, T, N, H), 'attn.hook_rot_k': (B, T, K, H)})
    if cfg.mlp == 'swiglu':
      block['mlp.hook_pre_linear'] = (B, T, F)
    shapes.update({f'blocks.{i}.{name}': shape for name, shape in block.items()})
  return shapes


@pytest.fixture(scope='module', params=list(VARIANTS))
def variant(request):
  cfg = model_config(request.param)
  variables = init(cfg)
  return request.param, cfg, variables, interpret.run_with_cache(Transformer(cfg), variables,
                                                                 tokens())


def test_every_hook_point_has_its_shape_and_the_logits_are_the_models(variant):
  _, cfg, variables, (logits, cache) = variant
  assert {name: value.shape for name, value in cache.items()} == expected_shapes(cfg)
  np.testing.assert_allclose(logits, Transformer(cfg).apply(variables, tokens()), atol=1e-5)
  np.testing.assert_array_equal(cache['unembed.hook_out'], logits)


def test_the_residual_stream_adds_up(variant):
  _, cfg, _, (_, cache) = variant
  embed = cache['hook_embed'] + cache.get('hook_pos_embed', 0)
  np.testing.assert_allclose(cache['blocks.0.hook_resid_pre'], embed, atol=1e-6)
  for i in range(L):
    block = lambda name: cache[f'blocks.{i}.{name}']
    np.testing.assert_allclose(block('hook_resid_mid'),
                               block('hook_resid_pre') + block('hook_attn_out'), atol=1e-5)
    np.testing.assert_allclose(block('hook_resid_post'),
                               block('hook_resid_mid') + block('hook_mlp_out'), atol=1e-5)
    np.testing.assert_allclose(block('attn.hook_pattern'),
                               jax.nn.softmax(block('attn.hook_attn_scores'), axis=-1), atol=1e-6)
    np.testing.assert_allclose(block('attn.hook_pattern').sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(np.asarray(block('attn.hook_pattern')), k=1) == 0)  # Causal.


def test_scanned_layers_give_the_same_cache_per_layer(variant):
  name, cfg, variables, (logits, cache) = variant
  scanned = Transformer(model_config(name, scan=True))
  scanned_logits, scanned_cache = interpret.run_with_cache(scanned, stacked(variables), tokens())
  assert scanned_cache.keys() == cache.keys()
  for key in cache:
    np.testing.assert_allclose(scanned_cache[key], cache[key], atol=2e-5, err_msg=key)
  np.testing.assert_allclose(scanned_logits, logits, atol=2e-5)


@pytest.mark.parametrize('scan', [False, True])
def test_names_limit_what_is_kept(scan):
  cfg = model_config(scan=scan)
  model, variables = Transformer(cfg), init(cfg)
  variables = stacked(variables) if scan else variables
  _, cache = interpret.run_with_cache(model, variables, tokens(), ['blocks.1.attn.hook_pattern'])
  assert list(cache) == ['blocks.1.attn.hook_pattern']
  _, cache = interpret.run_with_cache(model, variables, tokens(),
                                      lambda name: name.endswith('hook_resid_post'))
  assert sorted(cache) == ['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']
  with pytest.raises(ValueError, match=r"no hook point 'blocks\.2\.hook_z'.*layers 0-1"):
    interpret.run_with_cache(model, variables, tokens(), ['blocks.2.hook_z'])


def test_a_model_not_looked_into_traces_as_without_hook_points():
  cfg = model_config()
  model, variables = Transformer(cfg), init(cfg)
  # Attention shows its scores and pattern [B, N, T, S] by a reshape only when they are asked for.
  reshapes = str(jax.make_jaxpr(model.apply)(variables, tokens())).count('reshape')
  looked = str(jax.make_jaxpr(lambda v, t: model.apply(v, t, mutable=['intermediates']))(
      variables, tokens()))
  assert looked.count('reshape') > reshapes


def zero_head_out_weights(variables: dict, layer: int, head: int) -> dict:
  params = jax.tree.map(lambda x: x, variables['params'])
  out = params[f'layers_{layer}']['attn']['out']
  out['kernel'] = out['kernel'].at[head].set(0)
  return {'params': params}


@pytest.mark.parametrize('scan', [False, True])
def test_zeroing_one_heads_z_equals_removing_its_output_weights(scan):
  cfg = model_config(scan=scan)
  variables = init(cfg)
  ablated = zero_head_out_weights(variables, 1, 2)
  expected = Transformer(model_config()).apply(ablated, tokens())
  hooks = {'blocks.1.attn.hook_z': lambda z_BTNH: z_BTNH.at[:, :, 2].set(0)}
  if scan:
    variables = stacked(variables)
  hooked = interpret.run_with_hooks(Transformer(cfg), variables, tokens(), hooks)
  np.testing.assert_allclose(hooked, expected, atol=2e-5)
  original = Transformer(cfg).apply(variables, tokens())
  assert np.abs(hooked - original).max() > 1e-2  # The head mattered.


@pytest.mark.parametrize('scan', [False, True])
def test_hooks_compose_with_grad_and_jit(scan):
  """d loss / d (a shift of hook_embed) is, summed over each token's positions, the gradient of
  the embedding table (untied): one computed through a hook, one through the params."""
  cfg = model_config(scan=scan)
  model, variables = Transformer(cfg), init(cfg)
  variables = stacked(variables) if scan else variables
  tokens_BT = tokens()

  def loss(logits_BTV):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits_BTV[:, :-1]),
                                         tokens_BT[:, 1:, None], axis=-1))

  @jax.jit
  def grad_through_hook(shift_BTD):
    return jax.grad(lambda shift: loss(interpret.run_with_hooks(
        model, variables, tokens_BT, {'hook_embed': lambda x: x + shift})))(shift_BTD)

  grad_BTD = grad_through_hook(jnp.zeros((B, T, D)))
  table_grad = jax.grad(lambda p: loss(model.apply({'params': p}, tokens_BT)))(
      variables['params'])['embed']['embedding']
  np.testing.assert_allclose(jnp.zeros((V, D)).at[tokens_BT].add(grad_BTD), table_grad,
                             atol=1e-6)


def test_a_hook_on_a_scanned_layer_edits_that_layer_only():
  variables = init(model_config())
  hooks = {'blocks.0.hook_resid_post': lambda x: x * 0.5}
  expected = interpret.run_with_cache(Transformer(model_config()), variables, tokens())
  hooked = interpret.run_with_hooks(Transformer(model_config(scan=True)), stacked(variables),
                                    tokens(), hooks)
  unscanned = interpret.run_with_hooks(Transformer(model_config()), variables, tokens(), hooks)
  np.testing.assert_allclose(hooked, unscanned, atol=2e-5)
  assert np.abs(hooked - expected[0]).max() > 1e-2


def test_bad_hooks_are_refused():
  cfg = model_config()
  model, variables = Transformer(cfg), init(cfg)
  with pytest.raises(ValueError, match=r"no hook point 'blocks\.0\.attn\.hook_result'"):
    interpret.run_with_hooks(model, variables, tokens(), {'blocks.0.attn.hook_result': abs})
  with pytest.raises(ValueError,
                     match=r'hook blocks\.0\.attn\.hook_z: returned shape \(2, 10, 4\)'):
    interpret.run_with_hooks(model, variables, tokens(),
                             {'blocks.0.attn.hook_z': lambda z: z.sum(-1)})


def test_logit_lens_ends_at_the_models_prediction(variant):
  _, cfg, variables, (logits, cache) = variant
  lens = interpret.logit_lens(Transformer(cfg), variables, tokens(), k=3)
  assert lens['top_tokens'].shape == (L + 1, B, T, 3) and lens['loss'].shape == (L + 1,)
  log_probs = jax.nn.log_softmax(logits)
  np.testing.assert_array_equal(lens['top_tokens'][-1], jax.lax.top_k(log_probs, 3)[1])
  loss = -jnp.take_along_axis(log_probs[:, :-1], tokens()[:, 1:, None], axis=-1).mean()
  np.testing.assert_allclose(lens['loss'][-1], loss, rtol=1e-5)
  assert len(set(np.round(np.asarray(lens['loss']), 4))) == L + 1  # Each row reads its own layer.


def test_direct_logit_attributions_sum_to_the_logit(variant):
  _, cfg, variables, (logits, _) = variant
  targets_B = jnp.array([3, 7])
  attribution = interpret.direct_logit_attribution(Transformer(cfg), variables, tokens(),
                                                   targets_B, position=4)
  assert attribution['heads'].shape == (B, L, N) and attribution['mlp'].shape == (B, L)
  total = sum(value.reshape(B, -1).sum(-1) for value in attribution.values())
  np.testing.assert_allclose(total, logits[jnp.arange(B), 4, targets_B], atol=1e-4)
  assert ('pos_embed' in attribution) == ('final_bias' in attribution) == (cfg.norm == 'layernorm')
  if not cfg.out_bias:  # The heads' W_O rows then account for the whole attention output.
    np.testing.assert_allclose(attribution['attn_bias'], 0, atol=1e-5)


def test_activation_patching_finds_the_one_position_that_differs():
  """Clean and corrupted differ at position 3 only: patching the clean residual there before
  layer 0 restores the clean run entirely, anywhere else before layer 0 changes nothing; a head
  entry equals the same patch made by hand with run_with_hooks."""
  cfg = model_config()
  model, variables = Transformer(cfg), init(cfg)
  clean_BT = tokens()
  corrupted_BT = clean_BT.at[:, 3].set((clean_BT[:, 3] + 1) % V)
  metric = interpret.logit_difference(jnp.array([1, 2]), jnp.array([5, 6]))
  result = interpret.activation_patching(model, variables, clean_BT, corrupted_BT, metric,
                                         batch_size=4)
  assert result['resid_pre'].shape == (L, T) and result['heads'].shape == (L, N)
  np.testing.assert_allclose(metric(model.apply(variables, clean_BT)), result['clean'], atol=1e-5)
  np.testing.assert_allclose(result['resid_pre'][0, 3], result['clean'], atol=1e-4)
  np.testing.assert_allclose(np.delete(result['resid_pre'][0], 3), result['corrupted'], atol=1e-4)
  assert abs(result['clean'] - result['corrupted']) > 1e-2
  np.testing.assert_allclose(result['resid_pre'][:, :3], result['corrupted'], atol=1e-4)  # Causal.

  _, clean = interpret.run_with_cache(model, variables, clean_BT, ['blocks.1.attn.hook_z'])
  by_hand = interpret.run_with_hooks(model, variables, corrupted_BT, {
      'blocks.1.attn.hook_z': lambda z: z.at[:, :, 2].set(clean['blocks.1.attn.hook_z'][:, :, 2])})
  np.testing.assert_allclose(result['heads'][1, 2], metric(by_hand), atol=1e-4)


def test_activation_patching_refuses_prompts_of_two_shapes():
  cfg = model_config()
  with pytest.raises(ValueError, match=r'clean tokens \(2, 10\) and corrupted tokens \(2, 9\)'):
    interpret.activation_patching(Transformer(cfg), init(cfg), tokens(), tokens()[:, :9],
                                  lambda logits: logits.sum())


def unique_tokens(seed=0) -> jax.Array:
  """[B, T] with no token twice, so that each embedding-table row belongs to one position."""
  return jax.random.permutation(jax.random.key(seed), V)[:B * T].reshape(B, T)


def test_gradient_x_input_equals_the_embedding_tables_gradient_times_its_rows():
  cfg = model_config()
  model, variables = Transformer(cfg), init(cfg)
  tokens_BT = unique_tokens()
  metric = interpret.logit_difference(jnp.array([1, 2]), jnp.array([5, 6]))
  attribution = interpret.gradient_x_input(model, variables, tokens_BT, metric)
  table_grad = jax.grad(lambda p: metric(model.apply({'params': p}, tokens_BT)))(
      variables['params'])['embed']['embedding']
  table = variables['params']['embed']['embedding']
  np.testing.assert_allclose(attribution, (table_grad[tokens_BT] * table[tokens_BT]).sum(-1),
                             atol=1e-5)


@pytest.mark.parametrize('variant, baseline', [('llama', 0), ('gpt2', None)])
def test_integrated_gradients_are_complete(variant, baseline):
  """Completeness (Sundararajan et al. 2017): the attributions sum to metric(tokens) -
  metric(baseline), here within 1% of that difference at 32 steps, the midpoint rule's error
  falling as steps^-2. Baselines: token 0's embeddings (rmsnorm), zero embeddings (layernorm
  with learned positions)."""
  cfg = model_config(variant)
  model, variables = Transformer(cfg), init(cfg)
  metric = lambda logits_BTV: logits_BTV[:, -1, 1].mean()
  baseline_hook = jnp.zeros_like if baseline is None else (
      lambda x: interpret.run_with_cache(model, variables, jnp.zeros_like(tokens()),
                                         ['hook_embed'])[1]['hook_embed'])
  difference = metric(model.apply(variables, tokens())) - metric(
      interpret.run_with_hooks(model, variables, tokens(), {'hook_embed': baseline_hook}))
  errors = {}
  for steps in (8, 32):
    attribution = interpret.integrated_gradients(model, variables, tokens(), metric, steps=steps,
                                                 baseline_BT=baseline)
    assert attribution.shape == (B, T)
    errors[steps] = abs(float(attribution.sum() - difference))
  assert errors[32] < 0.01 * abs(float(difference)), (errors, float(difference))
  assert errors[32] < errors[8] / 8, errors  # ~16x for a steps^-2 error.


def induction_circuit(scan=False):
  """A two-layer attention-only model built by hand (Olsson et al. 2022's circuit): layer 0's
  head attends to the previous position and writes that token into a 'previous token' subspace;
  layer 1's head queries with the current token against keys of that subspace, so it attends to
  the position after an earlier occurrence of the current token. Residual: [token one-hot |
  position one-hot | previous-token one-hot]."""
  vocab, positions = 64, 32
  cfg = dataclasses.replace(
      model_config(positions='learned', mlp='gelu', num_heads=1, num_kv_heads=1,
                   head_dim=vocab, vocab_size=vocab, d_model=2 * vocab + positions,
                   max_seq_len=positions), scan_layers=False)
  tok, pos, prev = (np.arange(vocab), vocab + np.arange(positions),
                    vocab + positions + np.arange(vocab))
  params = jax.tree.map(np.zeros_like, nn.unbox(Transformer(cfg).init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']))
  params['embed']['embedding'][np.arange(vocab), tok] = 1
  params['pos_embedding'][np.arange(positions), pos] = 1
  params['final_norm']['scale'][:] = 1
  rms_scale = np.sqrt(cfg.d_model / 2)  # What the norm multiplies a two-one-hot residual by.
  layer0, layer1 = params['layers_0'], params['layers_1']
  for layer in (layer0, layer1):
    layer['attn_norm']['scale'][:] = layer['mlp_norm']['scale'][:] = 1
  layer0['attn']['query']['kernel'][pos[1:], 0, np.arange(1, positions)] = 2  # Query: my position,
  layer0['attn']['key']['kernel'][pos[:-1], 0, np.arange(1, positions)] = 2  # key: position + 1.
  layer0['attn']['value']['kernel'][tok, 0, np.arange(vocab)] = 1
  layer0['attn']['out']['kernel'][0, np.arange(vocab), prev] = 1 / rms_scale
  layer1['attn']['query']['kernel'][tok, 0, np.arange(vocab)] = 3  # Query: my token,
  layer1['attn']['key']['kernel'][prev, 0, np.arange(vocab)] = 3  # key: the previous token.
  variables = {'params': jax.tree.map(jnp.asarray, params)}
  if scan:
    return Transformer(dataclasses.replace(cfg, scan_layers=True)), stacked(variables)
  return Transformer(cfg), variables


@pytest.mark.parametrize('scan', [False, True])
def test_a_hand_built_induction_circuit_scores_high_and_a_random_model_low(scan):
  model, variables = induction_circuit(scan)
  scores = interpret.induction_scores(model, variables, jax.random.key(0), length=12)
  assert scores.shape == (2, 1)
  assert scores[1, 0] > 0.85 and scores[0, 0] < 0.05, scores  # Layer 0: the previous token.
  random_model = Transformer(model_config(scan=scan))
  random_scores = interpret.induction_scores(
      random_model, nn.unbox(random_model.init(jax.random.key(1), tokens())), jax.random.key(0),
      length=12)
  assert random_scores.shape == (L, N) and random_scores.max() < 0.15, random_scores


def test_induction_scores_refuse_a_repeat_longer_than_the_positions():
  cfg = model_config('gpt2')
  with pytest.raises(ValueError, match='length=20 repeated is longer than the model.s 32 learned'):
    interpret.induction_scores(Transformer(cfg), init(cfg), jax.random.key(0), length=20)


def test_plots_write_pngs(tmp_path, variant):
  pytest.importorskip('matplotlib')
  _, _, _, (_, cache) = variant
  figure = interpret.plot_attention(cache['blocks.0.attn.hook_pattern'][0, 1], list('abcdefghij'),
                                    tmp_path / 'attention.png', title='head 0.1')
  assert figure.axes[0].get_title() == 'head 0.1'
  interpret.plot_heatmap(np.arange(6).reshape(2, 3), tmp_path / 'map.png',
                         annotations=[['a', 'b', 'c'], ['d', 'e', 'f']])
  for name in ('attention.png', 'map.png'):
    assert (tmp_path / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
