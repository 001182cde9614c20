"""AdaLoRA (Zhang et al. 2023, ICLR): LoRA in SVD form whose rank budget moves to where it matters.

Each adapted Dense holds P = lora_a [*in, r], the singular values e = lora_e [r] and Q = lora_b
[r, *out] (model/layers.py; merged and switched like LoRA by lepton_jax/lora.py). Training adds
two things, as PEFT's AdaLoraModel does (its numbers, so the two agree):

  orthogonality(params)  ||P^T P - I||_F + ||Q Q^T - I||_F averaged over matrices: a loss term
  allocate(tx, ...)      an optax wrapper that after each update scores every singular triplet
                         (EMAs of the sensitivity |w * grad| times its uncertainty) and zeroes the
                         least important e: none during `tinit` steps, then a cubic schedule from
                         the initial total rank to target_rank x matrices, re-masking every
                         `delta_t` steps, until step total_steps - tfinal fixes the final mask
                         at the target exactly; the remaining steps fine-tune under it.

Its scores and mask live in the optimizer state, so a resumed run continues exactly.
"""
import json
from typing import NamedTuple

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lepton_jax import lora, tree


def _matrices(params: dict) -> dict[str, dict]:
  """Module path -> its adapter params, for every SVD adapter; stacked (scan) layers too."""
  return {path: module for path, module in lora._adapted_modules(params).items()
          if 'lora_e' in module}


def _as_rows(module: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(P [M, in, r], e [M, r], Q [M, r, out]) with M the matrices of the module (L when stacked)."""
  e_Mr = module['lora_e'].reshape(-1, module['lora_e'].shape[-1])
  rank, matrices = e_Mr.shape[1], e_Mr.shape[0]
  p_Mir = module['lora_a'].reshape(matrices, -1, rank)
  q_Mro = module['lora_b'].reshape(matrices, rank, -1)
  return p_Mir, e_Mr, q_Mro


def orthogonality(params: dict) -> jax.Array:
  """PEFT's regulariser: mean over P and Q matrices of ||P^T P - I||_F and ||Q Q^T - I||_F."""
  norms = []
  for module in _matrices(params).values():
    p_Mir, _, q_Mro = (x.astype(jnp.float32) for x in _as_rows(module))
    eye_rr = jnp.eye(p_Mir.shape[-1])
    norms.append(jnp.linalg.norm(jnp.einsum('mir,mis->mrs', p_Mir, p_Mir) - eye_rr, axis=(1, 2)))
    norms.append(jnp.linalg.norm(jnp.einsum('mro,mso->mrs', q_Mro, q_Mro) - eye_rr, axis=(1, 2)))
  return jnp.mean(jnp.concatenate(norms))


def budgets(initial: int, target: int, total_steps: int, tinit: int, tfinal: int) -> np.ndarray:
  """The total rank budget after each step, PEFT's RankAllocator.budget_schedule in float64."""
  steps = np.arange(total_steps)
  remaining = 1 - (steps - tinit) / (total_steps - tfinal - tinit)
  cubic = ((initial - target) * remaining ** 3 + target).astype(np.int64)
  return np.where(steps <= tinit, initial, np.where(steps >= total_steps - tfinal, target, cubic))


class AllocatorState(NamedTuple):
  inner: optax.OptState
  count: jax.Array  # int32: updates taken (PEFT's global_step of the one being taken).
  sensitivity: optax.Params  # EMA of |w * grad|, like params (only the SVD leaves are read).
  uncertainty: optax.Params  # EMA of |(|w * grad|) - sensitivity|.
  keep: optax.Params  # 1 where a singular value is kept (read at the lora_e leaves).


def allocate(inner: optax.GradientTransformation, peft: ml_collections.ConfigDict,
             total_steps: int) -> optax.GradientTransformation:
  """`inner` (the run's optimizer) followed by AdaLoRA's budget allocation over `peft`'s schedule
  (config.peft: target_rank, tinit, tfinal, delta_t, beta1, beta2)."""
  final_step = total_steps - peft.tfinal

  def init(params):
    zeros = jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    return AllocatorState(inner.init(params), jnp.zeros((), jnp.int32), zeros, zeros,
                          jax.tree.map(jnp.ones_like, params))

  def update(grads, state, params):
    updates, inner_state = inner.update(grads, state.inner, params)
    new_params = optax.apply_updates(params, updates)
    step = state.count
    collect = step < final_step
    importance = jax.tree.map(lambda w, g: jnp.abs(w * g).astype(jnp.float32), new_params, grads)
    sensitivity = jax.tree.map(
        lambda s, i: jnp.where(collect, peft.beta1 * s + (1 - peft.beta1) * i, s),
        state.sensitivity, importance)
    uncertainty = jax.tree.map(
        lambda u, i, s: jnp.where(collect, peft.beta2 * u + (1 - peft.beta2) * jnp.abs(i - s), u),
        state.uncertainty, importance, sensitivity)
    scores = triplet_scores(jax.tree.map(jnp.multiply, sensitivity, uncertainty))
    all_scores = jnp.concatenate([s.reshape(-1) for s in scores.values()])
    num_matrices = sum(score.shape[0] for score in scores.values())
    initial = all_scores.size
    budget_S = jnp.asarray(budgets(initial, peft.target_rank * num_matrices, total_steps,
                                   peft.tinit, peft.tfinal))
    pruned = initial - budget_S[step]  # How many of the lowest scores are zeroed.
    threshold = jnp.where(pruned > 0, jnp.sort(all_scores)[jnp.maximum(pruned - 1, 0)], -jnp.inf)
    remask = ((step > peft.tinit) & collect & (step % peft.delta_t == 0)) | (step == final_step)
    masked = remask | (step > final_step)
    keep = dict(tree.merge(state.keep))
    new_params = tree.merge(new_params)
    for path, score in scores.items():
      module_keep = _module(keep, path)
      fresh = (score > threshold).astype(module_keep['lora_e'].dtype).reshape(
          module_keep['lora_e'].shape)
      module_keep['lora_e'] = jnp.where(remask, fresh, module_keep['lora_e'])
      module = _module(new_params, path)
      module['lora_e'] = jnp.where(masked, module['lora_e'] * module_keep['lora_e'],
                                   module['lora_e'])
    # The final mask is fixed from fresh statistics' scores; PEFT then resets them.
    reset = lambda x: jnp.where(step == final_step, jnp.zeros_like(x), x)
    sensitivity, uncertainty = jax.tree.map(reset, sensitivity), jax.tree.map(reset, uncertainty)
    updates = jax.tree.map(lambda new, old: (new - old).astype(old.dtype), new_params, params)
    return updates, AllocatorState(inner_state, step + 1, sensitivity, uncertainty, keep)

  return optax.GradientTransformation(init, update)


def _module(params: dict, path: str) -> dict:
  node = params
  for key in path.split('/'):
    node = node[key]
  return node


def triplet_scores(element_scores: dict) -> dict[str, jax.Array]:
  """Module path -> [M, r]: each singular triplet's importance, PEFT's mask_to_budget: e's score
  plus the mean score of its column of P and of its row of Q."""
  scores = {}
  for path, module in _matrices(element_scores).items():
    p_Mir, e_Mr, q_Mro = _as_rows(module)
    scores[path] = e_Mr + jnp.mean(p_Mir, axis=1) + jnp.mean(q_Mro, axis=2)
  return scores


def ranks(params: dict) -> dict[str, list[int]]:
  """Module path -> the rank of each of its matrices (one, or one per layer when stacked): how
  many singular values are not zero."""
  return {path: np.count_nonzero(np.asarray(_as_rows(module)[1]), axis=1).tolist()
          for path, module in _matrices(params).items()}


RANKS_FILE = 'adalora_ranks.json'


def write_ranks(workdir: str, params: dict, writer, step: int, is_coordinator: bool) -> dict:
  """Logs the final ranks and writes them to WORKDIR/adalora_ranks.json (module path -> the rank
  of each of its matrices, and their total)."""
  final = ranks(params)
  record = {'step': step, 'total_rank': sum(map(sum, final.values())), 'ranks': final}
  text = json.dumps(record, indent=1)
  logging.info('AdaLoRA ranks after step %d: %s', step, text)
  writer.write_text(step, 'adalora_ranks', text)
  if is_coordinator:
    (epath.Path(workdir) / RANKS_FILE).write_text(text)
  return record
