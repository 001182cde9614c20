"""The train state: what it holds, how it is initialised, and where each leaf lives on the mesh."""
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from lepton_jax import sharding, steps


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 key data; step keys are fold_in(key, step), so resume is exact.


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, mesh, rules, seq_len):
  """Abstract TrainState and its shardings, derived from the params' logical axis names."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  boxed_params = jax.eval_shape(model.init, jax.random.key(0), tokens)['params']
  param_sharding = sharding.param_shardings(boxed_params, mesh, rules)
  params = sharding.unbox_abstract(boxed_params)
  opt_state = jax.eval_shape(tx.init, params)
  is_sharding = lambda x: isinstance(x, jax.sharding.NamedSharding)
  replicated = sharding.replicated(mesh)
  # Moments mirror their param's sharding; factored (lower-rank) moments and counters replicate.
  opt_sharding = optax.tree_map_params(
      tx, lambda leaf, s: s if leaf.ndim == len(s.spec) else replicated,
      opt_state, param_sharding, transform_non_params=lambda _: replicated, is_leaf=is_sharding)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=opt_state, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  shardings = TrainState(step=replicated, params=param_sharding, opt_state=opt_sharding,
                         rng=replicated)
  return abstract, shardings


def init_state(model: nn.Module, tx: optax.GradientTransformation, seed: int, seq_len: int,
               shardings: TrainState) -> TrainState:
  """A fresh TrainState, initialised under jit straight into `shardings` (no host holds it all)."""
  def init(model, tx, seed, seq_len):
    params_key, dropout_key = jax.random.split(jax.random.key(seed))
    params = nn.unbox(model.init(params_key, jnp.zeros((1, seq_len), jnp.int32))['params'])
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(dropout_key))

  return jax.jit(init, static_argnums=(0, 1, 2, 3), out_shardings=shardings)(
      model, tx, seed, seq_len)


def jit_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   config, state_sharding, batch_sharding):
  """The train step jitted with explicit shardings; the old state's buffers are donated."""
  step_fn = functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule,
                              grad_accum_steps=config.grad_accum_steps, z_loss=config.z_loss)
  return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, sharding.replicated(state_sharding.step.mesh)),
                 donate_argnums=0)
