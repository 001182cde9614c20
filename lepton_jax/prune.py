"""Pruning (config.prune): masks over a model's weights, their schedule, and structured pruning.

Masked methods keep the model's shape and zero weights:
  magnitude  the smallest |w| of each Dense `layers` names (scope 'layer'), or of all of them
             together (scope 'global'), `sparsity` of them;
  n:m        of every m consecutive inputs of a Dense (per output), the n largest |w| kept: 2:4
             is the pattern sparse tensor cores multiply.
Each such Dense holds its mask in the `prune` collection (model/layers.py creates it, all True,
the shape of the 2-D matrix its matmul multiplies), so `masks_for` is a pytree transform needing
no layout table: a mask is its kernel reshaped. In training the masks are TrainState.masks;
`schedule_update` recomputes them at begin_step (one_shot) or on Zhu & Gupta's (2017) cubic ramp
(gradual), and zeroes the pruned weights and their optimizer moments, so that (with the mask in
the forward pass giving them no gradient) they stay exactly zero.

Structured methods remove whole units, the same number in every layer so that one config
describes the result: `heads` (query heads, the same number per kv group; with MHA the key and
value heads with them) and `ffn` (channels of the MLP), ranked by the L2 norm of a unit's weights
or by the first-order Taylor estimate of the loss change, (sum of w * dL/dw over the unit)^2
summed over batches (Molchanov et al. 2019). `prune` then returns the smaller model (fewer
num_heads, num_kv_heads or d_ff) and its variables. In training (one_shot or gradual, by norm)
they mask the units' kernels (UNIT_KERNELS) instead, so the model keeps its shape and its pruned
units contribute nothing; `prune` of the trained run (scripts/prune.py, the same config.prune) then
drops exactly those units, whose kernels are zero, for the smaller model.

scripts/prune.py writes a pruned checkpoint, laid out like a run's workdir (config.json with
`pruned_from`, checkpoints/0, the tokenizer): readers (sample.load, lepton-eval, export) take its
model and tokenizer from there (`resolve`), and `init_from=workdir:DIR` fine-tunes it.
"""
import dataclasses
import functools

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lepton_jax import checkpoint, config_lib, objectives, quant, sharding, steps, tree
from lepton_jax.model import Transformer
from lepton_jax.model.config import (ARCHITECTURE_FIELDS, FFN_WEIGHTS, HEAD_WEIGHTS, KV_WEIGHTS,
                                     UNIT_KERNELS, ModelConfig, PruneConfig, model_fields)

MASKS = 'prune'  # The variable collection (train_state.MASKS).


# --- masks ------------------------------------------------------------------------------------

def sparsity_at(prune: PruneConfig, step: jax.Array) -> jax.Array:
  """The sparsity of a mask update at `step`: config.prune.sparsity for one_shot; Zhu & Gupta's
  s + (s_0 - s) (1 - (step - begin) / (end - begin))^3 for gradual."""
  if prune.schedule == 'one_shot':
    return jnp.float32(prune.sparsity)
  progress = jnp.clip((step - prune.begin_step) / (prune.end_step - prune.begin_step), 0.0, 1.0)
  return prune.sparsity + (prune.initial_sparsity - prune.sparsity) * (1.0 - progress) ** 3


def updates_at(prune: PruneConfig, step: jax.Array) -> jax.Array:
  """Whether the masks are recomputed before the update of `step` (steps taken so far)."""
  if prune.schedule == 'one_shot':
    return step == prune.begin_step
  due = ((step - prune.begin_step) % prune.every_steps == 0) | (step == prune.end_step)
  return (step >= prune.begin_step) & (step <= prune.end_step) & due


def kept(score: jax.Array, sparsity: jax.Array) -> jax.Array:
  """True at the round((1 - sparsity) * size) largest scores (ties by position): the count is
  exact, so a mask's sparsity is what was asked to within one weight."""
  flat = score.reshape(-1)
  ranks = jnp.argsort(jnp.argsort(-flat, stable=True))
  keep = jnp.round((1.0 - sparsity) * flat.size).astype(jnp.int32)
  return (ranks < keep).reshape(score.shape)


def n_of_m(score_IO: jax.Array, n: int, m: int) -> jax.Array:
  """True at the n largest of every m consecutive inputs (rows of [in, out]), per output."""
  inputs, outputs = score_IO.shape
  grouped = score_IO.reshape(inputs // m, m, outputs)
  ranks = jnp.argsort(jnp.argsort(-grouped, axis=1, stable=True), axis=1)
  return (ranks < n).reshape(inputs, outputs)


def _stacked(mask: jax.Array) -> bool:
  return mask.ndim == 3  # [layers, in, out] under scan_layers; [in, out] otherwise.


def masks_for(prune: PruneConfig, params: dict, masks: dict, sparsity) -> dict:
  """New masks (a tree shaped like `masks`) from the magnitudes of the kernels they mask."""
  kernels = tree.select(params, masks)
  score = jax.tree.map(lambda kernel, mask: jnp.abs(kernel.reshape(mask.shape)), kernels, masks)
  if prune.method == 'n:m':
    per_matrix = lambda s: n_of_m(s, prune.n, prune.m)
  elif prune.scope == 'layer':
    per_matrix = lambda s: kept(s, sparsity)
  else:  # global: one ranking over every masked weight.
    leaves, treedef = jax.tree.flatten(score)
    flat = kept(jnp.concatenate([leaf.reshape(-1) for leaf in leaves]), sparsity)
    pieces = jnp.split(flat, np.cumsum([leaf.size for leaf in leaves])[:-1])
    return jax.tree.unflatten(treedef, [p.reshape(l.shape) for p, l in zip(pieces, leaves)])
  return jax.tree.map(lambda s, mask: jax.vmap(per_matrix)(s) if _stacked(mask) else
                      per_matrix(s), score, masks)


def apply_masks(params: dict, masks: dict) -> dict:
  """`params` with every masked-out kernel weight set to zero."""
  zeroed = jax.tree.map(lambda kernel, mask: jnp.where(mask.reshape(kernel.shape), kernel, 0),
                        tree.select(params, masks), masks)
  masked = set(tree.names(masks))
  return tree.merge(tree.partition(params, tree.map_with_names(
      lambda name, _: name not in masked, params))[0], zeroed)


def check_masks(prune: PruneConfig, masks: dict, trainable: dict | None = None) -> None:
  """One-line errors for masks that cannot be computed (n:m's m not dividing a Dense's inputs)
  or kept (a masked kernel that does not train, when `trainable` is given)."""
  if not masks:
    raise ValueError(f'config.prune.layers={prune.layers}: matches no Dense layer')
  trainable_names = set(tree.names(trainable)) if trainable is not None else None
  for name, mask in zip(tree.names(masks), jax.tree.leaves(masks)):
    inputs = mask.shape[-2]
    if prune.method == 'n:m' and inputs % prune.m:
      raise ValueError(f'config.prune.m={prune.m} does not divide the {inputs} inputs of '
                       f'{name.rsplit("/", 1)[0]}')
    if trainable_names is not None and name not in trainable_names:
      raise ValueError(f'config.prune: params/{name} is masked but frozen by config.trainable; '
                       'prune only trainable kernels')


def check_training(prune: PruneConfig, masks: dict | None, trainable: dict) -> None:
  """What lepton-train can prune, given a model's masks and trainable params (abstract or real):
  kernels that train, and units by their norm (Taylor scores need batches of their own)."""
  if prune.structured and prune.importance == 'taylor':
    raise ValueError("config.prune.importance='taylor': lepton-train ranks units by their norm; "
                     'Taylor scores prune a trained run once, with scripts/prune.py')
  if prune.method != 'none':
    check_masks(prune, masks or {}, trainable)


def schedule_update(cfg: ModelConfig, tx: optax.GradientTransformation):
  """`update(state) -> state` for the train step: at the schedule's steps, new masks (by weight
  magnitude or unit norm), and the pruned kernel weights and their optimizer moments zeroed."""
  prune = cfg.prune
  new_masks = functools.partial(unit_masks, cfg) if prune.structured else masks_for

  def now(state):
    masks = new_masks(prune, state.trainable, state.masks, sparsity_at(prune, state.step))
    masked = {}
    for name, kernel, mask in zip(tree.names(masks), jax.tree.leaves(tree.select(
        state.trainable, masks)), jax.tree.leaves(masks)):
      masked[name] = mask.reshape(kernel.shape)
    keep = tree.map_with_names(lambda name, _: masked.get(name, jnp.bool_(True)), state.trainable)
    # Moments shaped like their param lose the pruned entries; factored ones keep theirs.
    zero = lambda x, k: jnp.where(k, x, 0) if x.shape == k.shape else x
    opt_state = optax.tree_map_params(tx, zero, state.opt_state, keep,
                                      transform_non_params=lambda x: x)
    return state.replace(trainable=apply_masks(state.trainable, masks), opt_state=opt_state,
                         masks=masks)

  return lambda state: jax.lax.cond(updates_at(prune, state.step), now, lambda s: s, state)


def masked_model(model: Transformer, prune: PruneConfig) -> tuple[Transformer, dict]:
  """(the model with `prune`'s masks, its masks all True): what `masks_for` starts from."""
  masked = Transformer(dataclasses.replace(model.cfg, prune=prune))
  abstract = sharding.unbox_abstract(
      jax.eval_shape(masked.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return masked, jax.tree.map(lambda x: jnp.ones(x.shape, jnp.bool_), abstract.get(MASKS, {}))


# --- structured pruning -----------------------------------------------------------------------

def _layers(cfg: ModelConfig, params: dict) -> list[dict]:
  """Each block's params (slices of the stacked ones under scan_layers)."""
  if cfg.scan_layers:
    return [jax.tree.map(lambda x, i=i: x[i], params['layers']) for i in range(cfg.num_layers)]
  return [params[f'layers_{i}'] for i in range(cfg.num_layers)]


def _with_layers(cfg: ModelConfig, params: dict, layers: list[dict]) -> dict:
  if cfg.scan_layers:
    return dict(params, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *layers))
  return dict(params, **{f'layers_{i}': layer for i, layer in enumerate(layers)})


def unit_weights(cfg: ModelConfig, method: str) -> tuple[tuple[str, str, int], ...]:
  if method == 'ffn':
    return FFN_WEIGHTS
  return HEAD_WEIGHTS + (KV_WEIGHTS if cfg.num_kv_heads == cfg.num_heads else ())


def _weights_of(layer: dict, weights) -> list[tuple[tuple[str, ...], int]]:
  """(path inside the block's params, unit axis) of the weights the block has."""
  found = []
  for module, param, axis in weights:
    path = (*module.split('/'), param)
    node = layer
    for key in path:
      node = node.get(key) if isinstance(node, dict) else None
    if node is not None:
      found.append((path, axis))
  return found


def _get(layer: dict, path: tuple[str, ...]):
  for key in path:
    layer = layer[key]
  return layer


def unit_sums(layer: dict, values: dict, weights) -> jax.Array:
  """[units]: the sum over each unit's weights of `values` (a tree shaped like `layer`)."""
  total = 0.0
  for path, axis in _weights_of(layer, weights):
    value = _get(values, path)
    total = total + jnp.sum(value, axis=tuple(d for d in range(value.ndim) if d != axis))
  return total


def _along(keep_U: jax.Array, ndim: int, axis: int) -> jax.Array:
  """`keep_U` broadcastable against a weight of `ndim` axes whose unit axis is `axis`."""
  return jnp.expand_dims(keep_U, [d for d in range(ndim) if d != axis])


def importance(cfg: ModelConfig, params: dict, prune: PruneConfig,
               grads: list[dict] | None = None) -> jax.Array:
  """[layers, units] scores of config.prune.method's units: the L2 norm of a unit's weights, or
  with `grads` (the loss's gradients on a few batches) the Taylor score sum_b (sum w * g_b)^2.
  A unit whose kernels are all zero (pruned in training) scores -inf: it goes first."""
  weights = unit_weights(cfg, prune.method)
  layers = _layers(cfg, params)
  if prune.importance == 'norm':
    scores_LU = jnp.stack([jnp.sqrt(unit_sums(layer, jax.tree.map(jnp.square, layer), weights))
                           for layer in layers])
  elif not grads:
    raise ValueError("config.prune.importance='taylor' needs the loss's gradients")
  else:
    per_batch = [[jnp.square(unit_sums(layer, jax.tree.map(jnp.multiply, layer, grad), weights))
                  for layer, grad in zip(layers, _layers(cfg, g))] for g in grads]
    scores_LU = jnp.sum(jnp.array(per_batch), axis=0)
  dead_LU = jnp.stack([unit_sums(layer, jax.tree.map(jnp.abs, layer), UNIT_KERNELS[prune.method])
                       == 0 for layer in layers])
  return jnp.where(dead_LU, -jnp.inf, scores_LU)


def unit_keep(cfg: ModelConfig, prune: PruneConfig, scores_LU: jax.Array,
              sparsity) -> jax.Array:
  """[layers, units] True at the units each layer keeps at `sparsity` (traced or not): the
  highest scores, as many in every layer and at least one.

  Query heads are kept as many per kv group (the model stays GQA with num_kv_heads groups); MHA
  heads (each its own kv group) and FFN channels are ranked across the layer.
  """
  layers, units = scores_LU.shape
  groups = cfg.num_kv_heads if prune.method == 'heads' and cfg.num_kv_heads < cfg.num_heads else 1
  per_group = units // groups
  keep = jnp.maximum(1, jnp.round((1.0 - sparsity) * per_group))
  grouped = scores_LU.reshape(layers, groups, per_group)
  ranks = jnp.argsort(jnp.argsort(-grouped, axis=-1, stable=True), axis=-1)
  return (ranks < keep).reshape(layers, units)


def units_kept(cfg: ModelConfig, prune: PruneConfig, scores_LU: jax.Array) -> jax.Array:
  """[layers, kept] sorted indices of the units each layer keeps at config.prune.sparsity."""
  keep_LU = np.asarray(unit_keep(cfg, prune, scores_LU, prune.sparsity))
  return jnp.asarray(np.stack([np.flatnonzero(keep_U) for keep_U in keep_LU]))


def unit_masks(cfg: ModelConfig, prune: PruneConfig, params: dict, masks: dict,
               sparsity) -> dict:
  """New masks (a tree shaped like `masks`, over UNIT_KERNELS) keeping the units of highest norm
  at `sparsity`: the masked model computes what `shrink`'s smaller one would."""
  keep_LU = unit_keep(cfg, prune, importance(cfg, params, prune), sparsity)
  layers = []
  for layer, layer_masks, keep_U in zip(_layers(cfg, params), _layers(cfg, masks), keep_LU):
    unit_mask = lambda mask, kernel, axis, keep_U=keep_U: jnp.broadcast_to(
        _along(keep_U, kernel.ndim, axis), kernel.shape).reshape(mask.shape)
    layers.append(_replace_units(layer_masks, layer, UNIT_KERNELS[prune.method], unit_mask))
  return _with_layers(cfg, masks, layers)


def _replace_units(block: dict, reference: dict, weights, fn) -> dict:
  """`block` (a block's params, or its masks) with each unit weight that `reference` (the block's
  params) has replaced by fn(its value, the param, its unit axis); new dicts, so the caller's
  tree stays as it was."""
  block = jax.tree.map(lambda x: x, block)
  for path, axis in _weights_of(reference, weights):
    parent = _get(block, path[:-1])
    parent[path[-1]] = fn(parent[path[-1]], _get(reference, path), axis)
  return block


def _take_units(layer: dict, weights, kept_U: jax.Array) -> dict:
  return _replace_units(layer, layer, weights,
                        lambda w, _, axis: jnp.take(w, kept_U, axis=axis))


def _zero_units(layer: dict, weights, kept_U: jax.Array, units: int) -> dict:
  keep = jnp.zeros(units, jnp.bool_).at[kept_U].set(True)
  return _replace_units(layer, layer, weights,
                        lambda w, _, axis: jnp.where(_along(keep, w.ndim, axis), w, 0))


def shrink(model: Transformer, variables: dict, prune: PruneConfig,
           kept_LU: jax.Array) -> tuple[Transformer, dict]:
  """(the smaller model, its variables): only the units `kept_LU` keeps in each layer."""
  cfg, weights = model.cfg, unit_weights(model.cfg, prune.method)
  layers = [_take_units(layer, weights, kept) for layer, kept in
            zip(_layers(cfg, variables['params']), kept_LU)]
  kept = kept_LU.shape[1]
  if prune.method == 'ffn':
    smaller = dataclasses.replace(cfg, d_ff=kept)
  elif cfg.num_kv_heads == cfg.num_heads:
    smaller = dataclasses.replace(cfg, num_heads=kept, num_kv_heads=kept)
  else:
    smaller = dataclasses.replace(cfg, num_heads=kept)
  return Transformer(smaller), dict(variables,
                                    params=_with_layers(cfg, variables['params'], layers))


def zero_pruned_units(model: Transformer, variables: dict, prune: PruneConfig,
                      kept_LU: jax.Array) -> dict:
  """The full model's variables with the weights of the units `kept_LU` drops set to zero: what
  `shrink`'s smaller model computes."""
  cfg, weights = model.cfg, unit_weights(model.cfg, prune.method)
  units = cfg.d_ff if prune.method == 'ffn' else cfg.num_heads
  layers = [_zero_units(layer, weights, kept, units) for layer, kept in
            zip(_layers(cfg, variables['params']), kept_LU)]
  return dict(variables, params=_with_layers(cfg, variables['params'], layers))


# --- one-shot pruning of a loaded model -------------------------------------------------------

def prune(model: Transformer, variables: dict, prune_config: PruneConfig,
          grads: list[dict] | None = None) -> tuple[Transformer, dict]:
  """One-shot pruning of a loaded model (no masks of its own): (model, variables) with the
  masked methods' pruned weights zero (the same model), or the structured methods' smaller model.
  `grads`: the loss's gradients on a few batches, for importance='taylor'."""
  cfg = model.cfg
  prune_config.check()
  if cfg.lora.enabled or cfg.quant.weights != 'none' or MASKS in variables:
    raise ValueError('config.prune: prune a float model without adapters or masks (merge LoRA '
                     'adapters first, quantize after pruning)')
  if not prune_config.structured:
    _, masks = masked_model(model, prune_config)
    check_masks(prune_config, masks)
    masks = masks_for(prune_config, variables['params'], masks, prune_config.sparsity)
    return model, dict(variables, params=apply_masks(variables['params'], masks))
  scores = importance(cfg, variables['params'], prune_config, grads)
  return shrink(model, variables, prune_config, units_kept(cfg, prune_config, scores))


def nonzero_count(params: dict) -> int:
  return sum(int(jnp.count_nonzero(leaf)) for leaf in jax.tree.leaves(params))


# --- pruned checkpoints -----------------------------------------------------------------------

def read_pruned_config(workdir: str) -> ml_collections.ConfigDict | None:
  """DIR/config.json of a pruned checkpoint (scripts/prune.py), or None where it is not one."""
  saved = config_lib.read_run_config(workdir)
  return saved if saved is not None and 'pruned_from' in saved else None


def resolve(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """`config` with the model and tokenizer of the pruned checkpoint in `workdir` (unchanged when
  it is not one): a structured-pruned model has fewer heads or a smaller d_ff than its source."""
  saved = read_pruned_config(workdir)
  if saved is None:
    return config
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.model.update({field: saved.model[field] for field in ARCHITECTURE_FIELDS})
  resolved.data.tokenizer = saved.data.tokenizer
  resolved.data.tokenizer_path = saved.data.tokenizer_path
  resolved.init_from = ''
  return resolved


def save(out: str, config: ml_collections.ConfigDict, model: Transformer, variables: dict,
         tokenizer_path: str, source: str) -> None:
  """Writes a pruned checkpoint to the new directory `out` (see the module docstring) as step
  0; `source` (config.init_from's syntax) is recorded as its `pruned_from`."""
  out_dir = epath.Path(out)
  if out_dir.exists() and any(out_dir.iterdir()):
    raise FileExistsError(f'{out} is not empty: give a new directory for the pruned checkpoint')
  saved = ml_collections.ConfigDict(config.to_dict())
  saved.model.update(model_fields(model.cfg))
  copied = quant.copy_tokenizer(tokenizer_path, out_dir)
  saved.data.tokenizer_path = str(out_dir / copied) if copied else ''
  saved.init_from = ''
  saved.pruned_from = source
  all_params = jax.tree.map(lambda _: True, variables['params'])
  checkpointer = checkpoint.Checkpointer(out)
  checkpointer.save_variables(0, variables, checkpoint.describe(variables, all_params))
  checkpointer.close()
  (out_dir / config_lib.RUN_CONFIG).write_text(saved.to_json_best_effort(indent=2))


def loss_gradients(model: Transformer, variables: dict, batches: list[dict]) -> list[dict]:
  """The gradients of each batch's summed next-token loss w.r.t. the params (for Taylor
  importance)."""
  def loss(params, batch):
    return steps.summed_loss(dict(variables, params=params), model, batch, jax.random.key(0),
                             objectives.lm(), True)[0]
  grad = jax.jit(jax.grad(loss))
  return [grad(variables['params'], batch) for batch in batches]
