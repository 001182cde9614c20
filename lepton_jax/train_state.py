"""The train state: what it holds, how it is initialised, and where each leaf lives on the mesh.

The model reads a whole variables dict (`params` and any other collection). Training splits it in
two by `config.trainable` (path patterns over param names, lepton_jax/tree.py):

  TrainState.trainable  the params that train: differentiated, optimized, accumulated, and
                        saved with every checkpoint together with their optimizer state;
  frozen                every other variable (frozen params, other collections): an argument of
                        the step that is read, never given a gradient or an optimizer moment,
                        and saved once per run (checkpoint.Checkpointer.save_frozen).

Full training is the case where every param matches and `frozen` is empty. Only params train:
other collections (a KV cache, quantized weights) are frozen by nature. The pruning masks (the
`prune` collection, lepton_jax/prune.py) get no gradient either, but the pruning schedule changes
them, so they are TrainState.masks, saved with every checkpoint: a resumed run keeps them.
"""
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from lepton_jax import objectives, sharding, steps, tree


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  trainable: Any  # The trainable params (a nested dict under the 'params' collection).
  opt_state: Any
  rng: jax.Array  # uint32 key data; step keys are fold_in(key, step), so resume is exact.
  masks: Any = None  # The `prune` collection (a nested dict of bool masks), or None: no pruning.

  def variables(self, frozen: dict) -> dict:
    """What the model is applied to: the trainable params and the masks among the frozen."""
    masks = {MASKS: self.masks} if self.masks is not None else {}
    return tree.merge(steps.model_variables(self.trainable, frozen), masks)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Abstract values and shardings of everything a run holds on the mesh."""
  variables: dict  # ShapeDtypeStructs of the model's whole variables dict.
  variable_shardings: dict
  trainable_mask: dict  # Over variables['params']: True where the param trains.
  state: TrainState  # ShapeDtypeStructs.
  state_shardings: TrainState
  frozen: dict  # ShapeDtypeStructs of the frozen variables.
  frozen_shardings: dict
  params_copy: str | None = None  # The frozen collection that starts as a copy of the params.

  def split(self, variables: dict) -> tuple[dict, dict]:
    return split_variables(variables, self.trainable_mask)


MASKS = 'prune'  # The collection of pruning masks: in the TrainState, neither trained nor frozen.


def split_variables(variables: dict, trainable_mask: dict) -> tuple[dict, dict]:
  """A variables dict (or a tree shaped like one) -> (trainable params, frozen variables); the
  pruning masks, variables.get(MASKS), are in neither."""
  trainable, frozen_params = tree.partition(variables['params'], trainable_mask)
  others = {k: v for k, v in variables.items() if k not in ('params', MASKS)}
  return trainable, tree.merge({'params': frozen_params} if frozen_params else {}, others)


def boxed_variables(model: nn.Module, seq_len: int) -> dict:
  """Every variable `model.init` creates, abstract and boxed with its logical axis names."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))


def abstract_variables(model: nn.Module, mesh, rules, seq_len: int) -> tuple[dict, dict]:
  """(ShapeDtypeStructs, NamedShardings) of every variable `model.init` creates."""
  boxed = boxed_variables(model, seq_len)
  return sharding.unbox_abstract(boxed), sharding.param_shardings(boxed, mesh, rules)


def trainable_mask(params: Any, patterns) -> Any:
  return tree.mask(params, patterns, what='config.trainable')


def make_layout(model: nn.Module, tx: optax.GradientTransformation, mesh, rules, seq_len: int,
           trainable_patterns, params_copy: str | None = None) -> Layout:
  """The abstract TrainState and frozen variables, and their shardings, from the model's logical
  axis names and `trainable_patterns`. `params_copy` names a frozen collection that starts as a
  copy of every param, placed like them (objectives.Objective.params_copy)."""
  variables, variable_shardings = abstract_variables(model, mesh, rules, seq_len)
  mask = trainable_mask(variables['params'], trainable_patterns)
  trainable, frozen = split_variables(variables, mask)
  trainable_shardings, frozen_shardings = split_variables(variable_shardings, mask)
  if params_copy:
    frozen = dict(frozen, **{params_copy: variables['params']})
    frozen_shardings = dict(frozen_shardings, **{params_copy: variable_shardings['params']})
  opt_state = jax.eval_shape(tx.init, trainable)
  is_sharding = lambda x: isinstance(x, jax.sharding.NamedSharding)
  replicated = sharding.replicated(mesh)
  # Moments mirror their param's sharding; factored (lower-rank) moments and counters replicate.
  opt_sharding = optax.tree_map_params(
      tx, lambda leaf, s: s if leaf.ndim == len(s.spec) else replicated,
      opt_state, trainable_shardings, transform_non_params=lambda _: replicated,
      is_leaf=is_sharding)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), trainable=trainable,
                     opt_state=opt_state, rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
                     masks=variables.get(MASKS))
  state_shardings = TrainState(step=replicated, trainable=trainable_shardings,
                               opt_state=opt_sharding, rng=replicated,
                               masks=variable_shardings.get(MASKS))
  return Layout(variables, variable_shardings, mask, state, state_shardings, frozen,
                frozen_shardings, params_copy)


# For a program that runs once, on XLA:CPU: LLVM without optimisation compiles the init (one
# threefry and one initializer per variable: ~12k HLO ops for a 4-layer model) 2-3x faster, and
# running it unoptimised costs far less than that. Values may differ in the last bit from an
# optimised build (fused multiply-adds), never between runs or meshes.
ONCE_CPU_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def _initial_variables(model: nn.Module, params_key: jax.Array, seq_len: int, layout: Layout,
                       given: dict) -> dict:
  """The whole variables dict a fresh run starts from: `given` (trained weights, maybe a subset)
  where given, the model's random init elsewhere."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  if given:
    # What `given` lacks (a LoRA run's new adapters) is created by its initializer with the
    # given variables in place, so DoRA's magnitudes are the norms of the loaded kernels.
    _, variables = model.apply(given, tokens, rngs={'params': params_key},
                               mutable=list(layout.variables))
  else:
    variables = model.init(params_key, tokens)
  return nn.unbox(variables)


def _jit_once(fn, layout: Layout, given: dict, out_shardings):
  """`fn(given)` jitted into `out_shardings`, compiled as a program that runs once."""
  on_cpu = layout.state_shardings.step.mesh.devices.flat[0].platform == 'cpu'
  return jax.jit(fn, in_shardings=(tree.select(layout.variable_shardings, given),),
                 out_shardings=out_shardings,
                 compiler_options=ONCE_CPU_COMPILER_OPTIONS if on_cpu else None)(given)


def init_state(model: nn.Module, tx: optax.GradientTransformation, seed: int, seq_len: int,
               layout: Layout, variables: dict | None = None) -> tuple[TrainState, dict]:
  """A fresh (TrainState, frozen variables), initialised under jit straight into their shardings
  (no host ever holds the whole model). `variables` (trained weights placed on the layout's
  shardings, for any subset of the model's variables: a base without its new adapters) replace
  the random init where given."""
  params_key, dropout_key = jax.random.split(jax.random.key(seed))

  def init(given):
    variables = _initial_variables(model, params_key, seq_len, layout, given)
    trainable, frozen = layout.split(variables)
    if layout.params_copy:
      frozen[layout.params_copy] = jax.tree.map(jnp.copy, variables['params'])
    state = TrainState(step=jnp.int32(0), trainable=trainable, opt_state=tx.init(trainable),
                       rng=jax.random.key_data(dropout_key), masks=variables.get(MASKS))
    return state, frozen

  return _jit_once(init, layout, variables or {},
                   (layout.state_shardings, layout.frozen_shardings))


def start_variables(model: nn.Module, seed: int, seq_len: int, layout: Layout,
                    variables: dict | None = None) -> dict:
  """The variables init_state starts the same run from, without an optimizer state: what a
  resumed run rebuilds its starting policy from (DPO's reference). The same program on every
  start, so the same values at every resume."""
  params_key, _ = jax.random.split(jax.random.key(seed))
  init = lambda given: _initial_variables(model, params_key, seq_len, layout, given)
  return _jit_once(init, layout, variables or {}, layout.variable_shardings)


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   config, layout: Layout, batch_sharding, penalty=None):
  """`step(state, frozen, batch) -> (state, metrics)` jitted with explicit shardings; the old
  state's buffers are donated, the frozen variables only read. With pruning masks, the pruning
  schedule (lepton_jax/prune.py) updates them first, and the model reads them as the frozen."""
  train_step = functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule,
                                 grad_accum_steps=config.grad_accum_steps,
                                 objective=objectives.from_config(config, model),
                                 skip_nonfinite=config.nonfinite == 'skip', penalty=penalty)
  step_fn = train_step
  if layout.state.masks is not None:
    from lepton_jax import prune  # pylint: disable=g-import-not-at-top  (prune imports this module)
    update_masks = prune.schedule_update(model.cfg, tx)

    def step_fn(state, frozen, batch):
      state = update_masks(state)
      return train_step(state, tree.merge(frozen, {MASKS: state.masks}), batch)

  replicated = sharding.replicated(layout.state_shardings.step.mesh)
  return jax.jit(step_fn,
                 in_shardings=(layout.state_shardings, layout.frozen_shardings, batch_sharding),
                 out_shardings=(layout.state_shardings, replicated), donate_argnums=0)
