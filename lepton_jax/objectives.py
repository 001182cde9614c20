"""The losses a step can minimise (config.objective): pure functions of the model's outputs.

An objective is `loss(policy, frozen, batch) -> (loss_sum, sums)`:

  policy  `policy(tokens_BT, positions_BT=None, segment_ids_BT=None)`: the outputs of the model
          being trained (logits [B, T, V], or [B, num_labels] for a classification head);
  frozen  the same call on a frozen model whose outputs get no gradient (DPO's reference, a
          distillation teacher), made by `Objective.frozen_model(variables)`; None if it has none;
  batch   the batch's arrays, and any frozen inputs the data carries (precomputed log-probs).

`loss_sum` is the sum of per-unit losses over the batch (a unit is a counted token for lm and
sft) and `sums` holds `sums[objective.count]`, the number of units, with the sums of the metrics
the objective reports. The step divides the loss, its gradient and each metric by the global
total of that count, summed over micro-batches first: so gradient accumulation, and evaluation
over several batches, are exact for every objective.
"""
from collections.abc import Callable
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections

Batch = dict[str, jax.Array]
Sums = dict[str, jax.Array]
Forward = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a step minimises, and which of its sums normalises it."""
  loss: Callable[[Forward, Forward | None, Batch], tuple[jax.Array, Sums]]
  count: str  # The key of `sums` the loss, the gradients and the metrics are divided by.
  reported: tuple[str, ...] = ()  # The sums logged as metrics (per counted unit) in training.
  # variables -> the frozen model's forward (see the module docstring); None: no frozen model.
  frozen_model: Callable[[dict], Forward] | None = None

  def metrics(self, loss_sum, sums: Sums, prefix: str) -> dict[str, jax.Array]:
    """`prefix + 'loss'` and the `reported` sums, each per counted unit."""
    count = jnp.maximum(sums[self.count], 1.0)
    return {f'{prefix}loss': loss_sum / count, **{prefix + k: sums[k] / count
                                                  for k in self.reported}}


def token_losses(logits_BTV: jax.Array, targets_BT: jax.Array, z_loss: float):
  """Per-token cross-entropy (+ z_loss * log(Z)^2) and whether the argmax was right."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  loss_BT = log_z_BT - target_logit_BT + z_loss * jnp.square(log_z_BT)
  correct_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
  return loss_BT, correct_BT


def masked_cross_entropy(policy: Forward, frozen: Forward | None, batch: Batch, *,
                         z_loss: float) -> tuple[jax.Array, Sums]:
  """lm and sft: cross-entropy summed over the targets the batch's 'mask' counts (every target
  for lm; the loss tokens of task records for sft: the data pipeline sets the mask).

  Packed task rows carry 'positions' and 'segment_ids' (data/packing.py), which the model reads.
  """
  del frozen
  logits_BTV = policy(batch['inputs'], batch.get('positions'), batch.get('segment_ids'))
  loss_BT, correct_BT = token_losses(logits_BTV, batch['targets'], z_loss)
  mask_BT = batch['mask'] if 'mask' in batch else jnp.ones_like(loss_BT)
  return jnp.sum(loss_BT * mask_BT), {'tokens': jnp.sum(mask_BT),
                                      'correct': jnp.sum(correct_BT * mask_BT)}


def lm(z_loss: float = 0.0) -> Objective:
  """Next-token cross-entropy per counted token (lm and sft differ in the data's mask)."""
  return Objective(functools.partial(masked_cross_entropy, z_loss=z_loss), count='tokens')


def from_config(config: ml_collections.ConfigDict, model) -> Objective:
  """The objective `config.objective` names, with its settings from the config; `model` (the
  Transformer being trained) is what a frozen model is derived from."""
  del model
  if config.objective in ('lm', 'sft'):
    return lm(config.z_loss)
  raise ValueError(f'config.objective={config.objective!r}: no such objective')
