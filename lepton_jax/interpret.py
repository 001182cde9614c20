"""Looking inside a model: TransformerLens's hook names and tools over lepton's one Transformer.

  from lepton_jax import interpret
  logits_BTV, cache = interpret.run_with_cache(model, variables, tokens_BT)
  cache['blocks.0.attn.hook_pattern']  # [B, N, T, S]
  ablated_BTV = interpret.run_with_hooks(model, variables, tokens_BT, hooks={
      'blocks.1.attn.hook_z': lambda z_BTNH: z_BTNH.at[:, :, 3].set(0)})  # Head 1.3 removed.

The model marks its activations itself (model/hooks.py: Flax `sow` into 'intermediates', and hook
functions read at trace time), for scanned and unscanned layers and every variant; a model nobody
looks into traces exactly as without them. The names are TransformerLens's, with these
differences: `ln1/ln2/ln_final.hook_normalized` is the norm's whole output, after its scale and
bias (what the next layer reads; TransformerLens records it before them, the same thing only for
its folded models); `hook_pos_embed` exists only with learned positions (rope acts inside
attention: `hook_rot_q` / `hook_rot_k` are the rotated queries and keys); gated MLPs add
`hook_pre_linear`; masked attention scores are float32's minimum, not -inf. Attention runs as
'xla' here whatever the config says (the fused kernels expose no scores).

On top of the two runs: the logit lens, direct logit attribution, activation patching, token
attribution and induction scores; `plot_heatmap` / `plot_attention` draw their results.
"""
import dataclasses
import functools
import re
from typing import Callable, Iterable

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp

from lepton_jax.model import ModelConfig, Transformer, layers, transformer
from lepton_jax.model import hooks as model_hooks

Names = Iterable[str] | str | Callable[[str], bool] | None
Metric = Callable[[jax.Array], jax.Array]  # logits [B, T, V] -> a scalar.
_NOTHING = frozenset()


def run_with_cache(model: Transformer, variables: dict, tokens_BT,
                   names: Names = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(logits [B, T, V], {hook name: activation}) of one jitted forward pass.

  `names`: None (every hook point), a list of names, or a predicate over names; only those are
  recorded (under scanned layers, a point any of whose layers is asked for is kept per layer
  while the scan runs, then dropped).
  """
  tokens_BT = jnp.asarray(tokens_BT)
  return _cached_forward(model, _selected(model, tokens_BT.shape, names), variables, tokens_BT)


def run_with_hooks(model: Transformer, variables: dict, tokens_BT,
                   hooks: dict[str, Callable[[jax.Array], jax.Array]]) -> jax.Array:
  """Logits [B, T, V] of a forward pass in which each hook point named in `hooks` is replaced by
  its function of it (same shape). Traceable: jit it, differentiate through it, close the
  functions over traced values (another run's activations, a scale to differentiate by).
  """
  tokens_BT = jnp.asarray(tokens_BT)
  _selected(model, tokens_BT.shape, list(hooks))
  return _run(model, variables, tokens_BT, _NOTHING, hooks)[0]


def hook_shapes(model: Transformer, tokens_BT) -> dict[str, jax.ShapeDtypeStruct]:
  """Every hook point of `model` (its name -> its shape) on tokens of this shape."""
  return dict(_hook_shapes(model, tuple(jnp.shape(tokens_BT))))


@functools.lru_cache(maxsize=64)
def _hook_shapes(model: Transformer, shape: tuple[int, int]):
  tokens = jax.ShapeDtypeStruct(shape, jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
  every = lambda _: True
  return tuple(jax.eval_shape(lambda v, t: _run(model, v, t, every, {})[1], variables,
                              tokens).items())


def _selected(model: Transformer, shape, names: Names) -> frozenset[str]:
  """The hook names `names` selects; raises naming one the model does not have."""
  known = dict(_hook_shapes(model, tuple(shape)))
  if names is None:
    return frozenset(known)
  if callable(names):
    return frozenset(filter(names, known))
  names = [names] if isinstance(names, str) else list(names)
  for name in names:
    if name not in known:
      points = dict.fromkeys(re.sub(r'^blocks\.\d+\.', 'blocks.{i}.', n) for n in known)
      raise ValueError(f'no hook point {name!r} in this model (layers 0-{model.cfg.num_layers - 1}'
                       f'); it has {", ".join(points)}')
  return frozenset(names)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _cached_forward(model, keep: frozenset[str], variables, tokens_BT):
  return _run(model, variables, tokens_BT, keep, {})


def _run(model: Transformer, variables: dict, tokens_BT: jax.Array, keep, fns: dict):
  """(logits, {name: activation} of the names `keep` holds or accepts) with hook functions
  `fns`."""
  cfg = model.cfg
  if cfg.attention != 'xla':
    model = model.clone(cfg=dataclasses.replace(cfg, attention='xla'))
  if cfg.scan_layers and any(name.startswith('blocks.') for name in fns):
    variables = {**variables,
                 model_hooks.LAYER_INDEX: {'layers': {'index': jnp.arange(cfg.num_layers)}}}
  keep = keep.__contains__ if isinstance(keep, frozenset) else keep
  with model_hooks.session(keep, fns, cfg.num_layers):
    logits_BTV, state = model.apply(variables, tokens_BT, mutable=[model_hooks.INTERMEDIATES])
  recorded = traverse_util.flatten_dict(state.get(model_hooks.INTERMEDIATES, {}))
  return logits_BTV, _by_layer(recorded, cfg.num_layers, keep)


def _by_layer(recorded: dict, num_layers: int, keep) -> dict[str, jax.Array]:
  """{name: value} of the flattened 'intermediates' that `keep` accepts, scanned values split
  per layer."""
  named = {}
  for path, value in recorded.items():
    template = model_hooks.full_name(path[:-1], path[-1])
    if '{}' not in template:
      named[template] = value
      continue
    for layer in range(num_layers):
      named[template.format(layer)] = value[layer]
  return {name: value for name, value in named.items() if keep(name)}


class _Unembed(nn.Module):
  """The model's final norm (unless `norm` is False) and output head, applied to residuals."""
  cfg: ModelConfig
  norm: bool = True

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    if self.norm:
      x_BTD = layers.make_norm(self.cfg, 'final_norm')(x_BTD)
    return transformer.head(self.cfg, transformer.embedding(self.cfg), x_BTD).astype(jnp.float32)


def _residuals(model, variables, tokens_BT) -> jax.Array:
  """[L + 1, B, T, D]: the embeddings, then each block's output."""
  L = model.cfg.num_layers
  names = ['blocks.0.hook_resid_pre'] + [f'blocks.{i}.hook_resid_post' for i in range(L)]
  _, cache = run_with_cache(model, variables, tokens_BT, names)
  return jnp.stack([cache[name] for name in names])


def logit_lens(model: Transformer, variables: dict, tokens_BT, k: int = 5) -> dict[str, jax.Array]:
  """What the residual stream predicts after each layer (nostalgebraist 2020): the embeddings and
  each block's output through the final norm and the head.

  Row 0 reads the embeddings (blocks.0.hook_resid_pre), row i + 1 blocks.{i}.hook_resid_post;
  the last row is the model's own prediction. 'top_tokens' [L + 1, B, T, k] and
  'top_log_probs' [L + 1, B, T, k]: each row's k likeliest next tokens; 'loss' [L + 1]: its mean
  next-token cross-entropy over the tokens' own continuations.
  """
  return _lens(model, k, variables, jnp.asarray(tokens_BT))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _lens(model, k, variables, tokens_BT):
  unembed = _Unembed(model.cfg)

  def read(x_BTD):
    log_probs_BTV = jax.nn.log_softmax(unembed.apply(variables, x_BTD))
    top_log_probs, top_tokens = jax.lax.top_k(log_probs_BTV, k)
    next_BT1 = tokens_BT[:, 1:, None]
    loss = -jnp.take_along_axis(log_probs_BTV[:, :-1], next_BT1, axis=-1).mean()
    return top_tokens, top_log_probs, loss

  top_tokens, top_log_probs, loss = jax.lax.map(read, _residuals(model, variables, tokens_BT))
  return {'top_tokens': top_tokens, 'top_log_probs': top_log_probs, 'loss': loss}


def _layer_param(params: dict, cfg: ModelConfig, layer: int, *path: str) -> jax.Array:
  if cfg.scan_layers:
    return functools.reduce(dict.__getitem__, path, params['layers'])[layer]
  return functools.reduce(dict.__getitem__, path, params[f'layers_{layer}'])


def direct_logit_attribution(model: Transformer, variables: dict, tokens_BT, targets_B,
                             position: int = -1) -> dict[str, jax.Array]:
  """What each component writes directly into the logit of targets_B[b] at `position`.

  The final norm's scale (and layernorm's centring) is read off this run and held fixed, as
  TransformerLens does, which makes the norm linear: the attributions then sum to the logit
  itself. 'embed' [B] (and 'pos_embed' [B] with learned positions), 'heads' [B, L, N] (head n's
  hook_z times its rows of W_O), 'attn_bias' [B, L] (the rest of the attention output: its
  bias), 'mlp' [B, L], and with layernorm 'final_bias' [B] (the norm's bias through the head).
  For a logit difference, subtract two attributions.
  """
  cfg = model.cfg
  if cfg.lora.enabled or cfg.quant.weights != 'none':
    raise ValueError('direct_logit_attribution reads W_O from float params: lora.merge the '
                     'adapters, or use the float model, first')
  L, params = cfg.num_layers, variables['params']
  _, cache = run_with_cache(model, variables, tokens_BT, lambda name: any(
      name.endswith(suffix) for suffix in (
          'hook_embed', 'hook_pos_embed', 'attn.hook_z', 'hook_attn_out', 'hook_mlp_out',
          f'blocks.{L - 1}.hook_resid_post')))
  at = {name: value[:, position].astype(jnp.float32) for name, value in cache.items()}
  center = (lambda x: x - x.mean(-1, keepdims=True)) if cfg.norm == 'layernorm' else (lambda x: x)
  final_BD = center(at[f'blocks.{L - 1}.hook_resid_post'])
  scale_B1 = jnp.sqrt(jnp.mean(final_BD ** 2, axis=-1, keepdims=True) + cfg.norm_eps)
  # The head is linear: its gradient is the target's unembedding direction, tied or not.
  target_logit = lambda y_D, target: _Unembed(cfg, norm=False).apply(variables, y_D[None, None])[
      0, 0, target]
  direction_BD = jax.vmap(jax.grad(target_logit))(jnp.zeros_like(final_BD), jnp.asarray(targets_B))
  read_BD = direction_BD * params['final_norm']['scale'].astype(jnp.float32) / scale_B1
  attribute = lambda x_BD: jnp.sum(center(x_BD) * read_BD, axis=-1)

  heads, attn_bias, mlp = [], [], []
  for i in range(L):
    w_out_NHD = _layer_param(params, cfg, i, 'attn', 'out', 'kernel').astype(jnp.float32)
    heads_BND = jnp.einsum('bnh,nhd->bnd', at[f'blocks.{i}.attn.hook_z'], w_out_NHD)
    heads.append(jax.vmap(attribute, in_axes=1, out_axes=1)(heads_BND))
    attn_bias.append(attribute(at[f'blocks.{i}.hook_attn_out'] - heads_BND.sum(1)))
    mlp.append(attribute(at[f'blocks.{i}.hook_mlp_out']))
  result = {'embed': attribute(at['hook_embed'])}
  if 'hook_pos_embed' in at:
    result['pos_embed'] = attribute(at['hook_pos_embed'])
  result.update(heads=jnp.stack(heads, 1), attn_bias=jnp.stack(attn_bias, 1),
                mlp=jnp.stack(mlp, 1))
  if cfg.norm == 'layernorm':
    result['final_bias'] = jnp.sum(params['final_norm']['bias'].astype(jnp.float32) *
                                   direction_BD, axis=-1)
  return result


def logit_difference(correct_B, incorrect_B, position: int = -1) -> Metric:
  """A metric: the mean over rows of logit[correct] - logit[incorrect] at `position`."""
  correct_B, incorrect_B = jnp.asarray(correct_B), jnp.asarray(incorrect_B)

  def metric(logits_BTV):
    logits_BV = logits_BTV[:, position]
    pick = lambda tokens_B: jnp.take_along_axis(logits_BV, tokens_B[:, None], axis=-1)[:, 0]
    return jnp.mean(pick(correct_B) - pick(incorrect_B))
  return metric


def activation_patching(model: Transformer, variables: dict, clean_BT, corrupted_BT,
                        metric: Metric, batch_size: int = 16) -> dict[str, jax.Array]:
  """Where the difference between a clean and a corrupted prompt lives (Meng et al. 2022; Zhang
  & Nanda 2023): the corrupted run with one clean activation patched in, scored by `metric`.

  'resid_pre' [L, T]: clean blocks.{l}.hook_resid_pre at position t alone patched in; 'heads'
  [L, N]: clean blocks.{l}.attn.hook_z of head n alone (every position); 'clean', 'corrupted':
  the metric of the two unpatched runs, so (value - corrupted) / (clean - corrupted) is the share
  of the clean behaviour one patch restores. `batch_size` patched runs go through at once.
  """
  cfg = model.cfg
  clean_BT, corrupted_BT = jnp.asarray(clean_BT), jnp.asarray(corrupted_BT)
  if clean_BT.shape != corrupted_BT.shape:
    raise ValueError(f'clean tokens {clean_BT.shape} and corrupted tokens {corrupted_BT.shape} '
                     'must have one shape: patching swaps activations position by position')
  L, T, N = cfg.num_layers, clean_BT.shape[1], cfg.num_heads
  kinds = {  # hook template, what one patch selects: positions of [B, T, D], heads of [B, T, N, H].
      'resid_pre': ('blocks.{}.hook_resid_pre', T, lambda j: (jnp.arange(T) == j)[:, None]),
      'heads': ('blocks.{}.attn.hook_z', N, lambda j: (jnp.arange(N) == j)[:, None])}
  clean_logits, cache = run_with_cache(model, variables, clean_BT, [
      template.format(i) for template, _, _ in kinds.values() for i in range(L)])

  @jax.jit
  def patch_all(variables, cache):
    result = {'clean': metric(clean_logits),
              'corrupted': metric(_run(model, variables, corrupted_BT, _NOTHING, {})[0])}
    for kind, (template, size, select) in kinds.items():
      def patched(layer_and_index, template=template, select=select):
        layer, index = layer_and_index
        fns = {template.format(i): functools.partial(
            lambda x, i, clean: jnp.where((layer == i) & select(index), clean, x), i=i,
            clean=cache[template.format(i)]) for i in range(L)}
        return metric(_run(model, variables, corrupted_BT, _NOTHING, fns)[0])
      layers_, indices = (grid.ravel() for grid in jnp.meshgrid(jnp.arange(L), jnp.arange(size),
                                                                indexing='ij'))
      result[kind] = jax.lax.map(patched, (layers_, indices),
                                 batch_size=batch_size).reshape(L, size)
    return result
  return patch_all(variables, cache)


def _embedding_metric(model, variables, tokens_BT, metric):
  """metric as a function of the token embeddings (hook_embed) of `tokens_BT`."""
  return lambda embeds_BTD: metric(_run(model, variables, tokens_BT, _NOTHING,
                                        {'hook_embed': lambda _: embeds_BTD})[0])


def _embeddings(model, variables, tokens_BT) -> jax.Array:
  return run_with_cache(model, variables, tokens_BT, ['hook_embed'])[1]['hook_embed']


def gradient_x_input(model: Transformer, variables: dict, tokens_BT,
                     metric: Metric) -> jax.Array:
  """[B, T]: each token's embedding dotted with the metric's gradient there (Shrikumar et al.
  2016), the first-order estimate of what removing the token's embedding would change."""
  tokens_BT = jnp.asarray(tokens_BT)
  embeds_BTD = _embeddings(model, variables, tokens_BT)
  grads_BTD = jax.jit(jax.grad(_embedding_metric(model, variables, tokens_BT, metric)))(embeds_BTD)
  return jnp.sum(grads_BTD * embeds_BTD, axis=-1)


def integrated_gradients(model: Transformer, variables: dict, tokens_BT, metric: Metric,
                         steps: int = 50, baseline_BT=None) -> jax.Array:
  """[B, T]: integrated gradients (Sundararajan et al. 2017) over the token embeddings, along the
  straight line from a baseline by the midpoint rule at `steps` points.

  The baseline is the embeddings of tokens `baseline_BT` (a [B, T] array or one id, such as a pad
  token), or zero embeddings when None (learned positions stay). Completeness: the attributions
  sum to metric(tokens) - metric(baseline) up to the quadrature error, which falls as
  1 / steps^2. Prefer a token baseline for rmsnorm models: norms are blind to scale, so from zero
  embeddings nearly all of the change happens within a sliver of the path near the baseline (the
  norm of an almost vanishing residual), which no uniform rule resolves.
  """
  tokens_BT = jnp.asarray(tokens_BT)
  embeds_BTD = _embeddings(model, variables, tokens_BT)
  baseline_BTD = jnp.zeros_like(embeds_BTD) if baseline_BT is None else _embeddings(
      model, variables, jnp.broadcast_to(jnp.asarray(baseline_BT), tokens_BT.shape))
  grad = jax.grad(_embedding_metric(model, variables, tokens_BT, metric))

  @jax.jit
  def attribute(embeds_BTD, baseline_BTD):
    delta_BTD = embeds_BTD - baseline_BTD
    alphas = (jnp.arange(steps) + 0.5) / steps
    mean_grad_BTD = jax.lax.map(lambda alpha: grad(baseline_BTD + alpha * delta_BTD),
                                alphas).mean(0)
    return jnp.sum(mean_grad_BTD * delta_BTD, axis=-1)
  return attribute(embeds_BTD, baseline_BTD)


def induction_scores(model: Transformer, variables: dict, key: jax.Array,
                     length: int | None = None, batch_size: int = 4) -> jax.Array:
  """[L, N]: each head's induction score (Olsson et al. 2022, TransformerLens's form).

  On `batch_size` rows of `length` uniformly random tokens (default min(50, max_seq_len // 2))
  repeated once, the mean attention from each token of the repeat to the token after its first
  occurrence (position t to t - length + 1). An induction head scores near 1; one that attends
  evenly over what it sees about ln 2 / length.
  """
  cfg = model.cfg
  length = length or min(50, cfg.max_seq_len // 2)
  if cfg.positions == 'learned' and 2 * length > cfg.max_seq_len:
    raise ValueError(f'induction_scores: length={length} repeated is longer than the model\'s '
                     f'{cfg.max_seq_len} learned positions')
  random_BT = jax.random.randint(key, (batch_size, length), 0, cfg.vocab_size)
  tokens_BT = jnp.concatenate([random_BT, random_BT], axis=1)
  names = [f'blocks.{i}.attn.hook_pattern' for i in range(cfg.num_layers)]
  _, cache = run_with_cache(model, variables, tokens_BT, names)
  dest = jnp.arange(length, 2 * length)
  return jnp.stack([cache[name][:, :, dest, dest - length + 1].mean((0, 2)) for name in names])


def plot_heatmap(values_YX, path: str | None = None, *, title: str = '', xlabel: str = '',
                 ylabel: str = '', xticklabels=None, yticklabels=None, annotations=None,
                 cmap: str = 'viridis', vmin=None, vmax=None):
  """A matplotlib Figure of a [Y, X] array (rows top to bottom), written as a PNG to `path`
  when given; `annotations` [Y][X] are strings written in the cells (the logit lens's tokens)."""
  from matplotlib import figure  # pylint: disable=g-import-not-at-top  (the notebook extra)
  values_YX = jnp.asarray(values_YX, jnp.float32)
  Y, X = values_YX.shape
  fig = figure.Figure(figsize=(min(2 + 0.45 * X, 16), min(1.5 + 0.4 * Y, 12)), layout='constrained')
  ax = fig.add_subplot()
  image = ax.imshow(values_YX, cmap=cmap, vmin=vmin, vmax=vmax, aspect='auto',
                    interpolation='nearest')
  fig.colorbar(image, ax=ax)
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  for labels, set_ticks, size in ((xticklabels, ax.set_xticks, X), (yticklabels, ax.set_yticks, Y)):
    if labels is not None:
      set_ticks(range(size), [str(label) for label in labels],
                **({'rotation': 90} if set_ticks == ax.set_xticks else {}))
  if annotations is not None:
    for y, row in enumerate(annotations):
      for x, text in enumerate(row):
        ax.text(x, y, text, ha='center', va='center', fontsize=7, color='white')
  if path is not None:
    fig.savefig(path, dpi=100)
  return fig


def plot_attention(pattern_TS, tokens: list[str], path: str | None = None, *,
                   title: str = 'attention'):
  """One head's pattern [T, S] (from blocks.{i}.attn.hook_pattern[b, n]) with the tokens as
  labels: rows are the attending tokens, columns the attended ones."""
  labels = [repr(token)[1:-1] for token in tokens]
  return plot_heatmap(pattern_TS, path, title=title, xlabel='attended (key)',
                      ylabel='attending (query)', xticklabels=labels, yticklabels=labels,
                      vmin=0.0, vmax=1.0)
