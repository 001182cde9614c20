"""The losses a step can minimise (config.objective): pure functions of the model's outputs.

An objective is `loss(policy, frozen, batch) -> (loss_sum, sums)`:

  policy  `policy(tokens_BT, positions_BT=None, segment_ids_BT=None)`: the outputs of the model
          being trained (logits [B, T, V], or [B, num_labels] for a classification head);
  frozen  the same call on a frozen model whose outputs get no gradient (DPO's reference, a
          distillation teacher), made by `Objective.frozen_model(variables)`; None if it has none;
  batch   the batch's arrays, and any frozen inputs the data carries (precomputed log-probs).

`loss_sum` is the sum of per-unit losses over the batch (a unit is a counted token for lm and
sft, a record for classify, a preference pair for dpo) and `sums` holds `sums[objective.count]`,
the number of units, with the sums of the metrics the objective reports. The step divides the
loss, its gradient and each metric by the global total of that count, summed over micro-batches
first: so gradient accumulation, and evaluation over several batches, are exact for every
objective.
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
  # A frozen variable collection that starts as a copy of the params (DPO's reference when the
  # whole model trains); train_state.make_layout adds it, so it is checkpointed once per run.
  params_copy: str | None = None

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


def softened_kl(teacher_BTV: jax.Array, student_BTV: jax.Array, temperature: float,
                top_k: int) -> jax.Array:
  """KL(p_T || q_T) per token [B, T] of the teacher's and the student's softmax at
  `temperature`; with `top_k`, of both restricted to the teacher's k most likely tokens and
  renormalised there (a student equal to its teacher scores 0 either way)."""
  if top_k:
    teacher_BTV, index_BTK = jax.lax.top_k(teacher_BTV, top_k)
    student_BTV = jnp.take_along_axis(student_BTV, index_BTK, axis=-1)
  log_p_BTV = jax.nn.log_softmax(teacher_BTV / temperature, axis=-1)
  log_q_BTV = jax.nn.log_softmax(student_BTV / temperature, axis=-1)
  return jnp.sum(jnp.exp(log_p_BTV) * (log_p_BTV - log_q_BTV), axis=-1)


def distillation(policy: Forward, frozen: Forward | None, batch: Batch, *, temperature: float,
                 alpha: float, top_k: int, z_loss: float) -> tuple[jax.Array, Sums]:
  """distill: alpha T^2 KL(teacher_T || student_T) + (1 - alpha) cross-entropy on the data, per
  token the batch's 'mask' counts (Hinton et al. 2015: T^2 keeps the soft targets' gradients
  at the scale of the hard ones'). `frozen` is the teacher."""
  inputs = (batch['inputs'], batch.get('positions'), batch.get('segment_ids'))
  student_BTV = policy(*inputs).astype(jnp.float32)
  teacher_BTV = jax.lax.stop_gradient(frozen(*inputs)).astype(jnp.float32)
  ce_BT, correct_BT = token_losses(student_BTV, batch['targets'], z_loss)
  kl_BT = softened_kl(teacher_BTV, student_BTV, temperature, top_k)
  mask_BT = batch['mask'] if 'mask' in batch else jnp.ones_like(ce_BT)
  loss_BT = alpha * temperature ** 2 * kl_BT + (1 - alpha) * ce_BT
  total = lambda x_BT: jnp.sum(x_BT * mask_BT)
  return total(loss_BT), {'tokens': jnp.sum(mask_BT), 'correct': total(correct_BT),
                          'kl': total(kl_BT), 'cross_entropy': total(ce_BT)}


def distill(teacher, temperature: float = 2.0, alpha: float = 0.5, top_k: int = 0,
            z_loss: float = 0.0) -> Objective:
  """Knowledge distillation from `teacher` (a Transformer whose variables are the frozen
  collection distill.TEACHER, lepton_jax/distill.py) on the student's tokens."""
  loss = functools.partial(distillation, temperature=temperature, alpha=alpha, top_k=top_k,
                           z_loss=z_loss)
  frozen_model = lambda variables: _forward(teacher, variables[TEACHER])
  return Objective(loss, 'tokens', ('kl', 'cross_entropy'), frozen_model)


TEACHER = 'teacher'  # The frozen collection holding a distillation teacher's variables.


def classification(policy: Forward, frozen: Forward | None, batch: Batch) -> tuple[jax.Array, Sums]:
  """classify: cross-entropy of the classify head's logits [B, C] against 'labels' [B], over the
  rows the batch's 'mask' [B] counts; the sums hold the correct count and the confusion matrix
  [C, C] (true label x predicted), from which evaluation derives accuracy and macro-F1."""
  del frozen
  logits_BC = policy(batch['inputs']).astype(jnp.float32)
  labels_B, mask_B = batch['labels'], batch['mask']
  log_probs_BC = jax.nn.log_softmax(logits_BC)
  loss_B = -jnp.take_along_axis(log_probs_BC, labels_B[:, None], axis=-1)[:, 0]
  predicted_B = jnp.argmax(logits_BC, axis=-1)
  num_labels = logits_BC.shape[-1]
  confusion_CC = jnp.einsum('b,bt,bp->tp', mask_B, jax.nn.one_hot(labels_B, num_labels),
                            jax.nn.one_hot(predicted_B, num_labels))
  return jnp.sum(loss_B * mask_B), {'examples': jnp.sum(mask_B),
                                    'accuracy': jnp.sum((predicted_B == labels_B) * mask_B),
                                    'confusion': confusion_CC}


def classify() -> Objective:
  return Objective(classification, count='examples', reported=('accuracy',))


DPO_LOSSES = ('sigmoid', 'ipo', 'robust')  # config.dpo.loss
DPO_METRICS = ('rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins',
               'logps/chosen', 'logps/rejected')  # TRL's names.


def sequence_logps(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """log p(targets) summed over the masked targets of each row: [B]."""
  log_z_BT = jax.nn.logsumexp(logits_BTV.astype(jnp.float32), axis=-1)
  target_BT = jnp.take_along_axis(logits_BTV.astype(jnp.float32), targets_BT[..., None],
                                  axis=-1)[..., 0]
  return jnp.sum((target_BT - log_z_BT) * mask_BT, axis=-1)


def dpo_losses(chosen_B, rejected_B, reference_chosen_B, reference_rejected_B, *, loss: str,
               beta: float, label_smoothing: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(loss, chosen reward, rejected reward) per pair from the sequence log-probs, as TRL:

    h = (pi_c - ref_c) - (pi_r - ref_r)
    sigmoid  -(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)   (DPO; eps: cDPO)
    robust   (-(1 - eps) logsigmoid(beta h) + eps logsigmoid(-beta h)) / (1 - 2 eps)  (rDPO)
    ipo      (h - 1 / (2 beta))^2                    (IPO; on length-averaged log-probs)

  with eps = label_smoothing; the rewards are beta (pi - ref) of each completion.
  """
  chosen_ratio_B = chosen_B - reference_chosen_B
  rejected_ratio_B = rejected_B - reference_rejected_B
  h_B = chosen_ratio_B - rejected_ratio_B
  eps = label_smoothing
  if loss == 'sigmoid':
    loss_B = -(1 - eps) * jax.nn.log_sigmoid(beta * h_B) - eps * jax.nn.log_sigmoid(-beta * h_B)
  elif loss == 'robust':
    loss_B = ((-(1 - eps) * jax.nn.log_sigmoid(beta * h_B) + eps * jax.nn.log_sigmoid(-beta * h_B))
              / (1 - 2 * eps))
  elif loss == 'ipo':
    loss_B = jnp.square(h_B - 1 / (2 * beta))
  else:
    raise ValueError(f'config.dpo.loss={loss!r}: expected one of {DPO_LOSSES}')
  return loss_B, beta * chosen_ratio_B, beta * rejected_ratio_B


def pair_logps(forward: Forward, batch: Batch, loss: str) -> jax.Array:
  """The sequence log-probs [2B] of a preference batch's chosen rows, then its rejected rows,
  run through `forward` as one [2B, T] batch (IPO's: averaged over each completion's tokens)."""
  both = lambda key: jnp.concatenate([batch[f'chosen_{key}'], batch[f'rejected_{key}']])
  loss_mask_BT = both('loss_mask')
  if loss == 'ipo':  # IPO compares length-averaged log-probs (as TRL does).
    loss_mask_BT = loss_mask_BT / jnp.maximum(loss_mask_BT.sum(-1, keepdims=True), 1.0)
  return sequence_logps(forward(both('inputs'), both('positions')), both('targets'), loss_mask_BT)


def preference(policy: Forward, frozen: Forward | None, batch: Batch, *, loss: str, beta: float,
               label_smoothing: float) -> tuple[jax.Array, Sums]:
  """dpo: the DPO loss of each pair the batch's 'mask' [B] counts.

  The batch holds chosen_ and rejected_ inputs, targets, positions and loss_mask [B, T] (the
  completion's targets, its eos included); both run through the model as one [2B, T] batch. The
  reference's log-probs are the batch's 'reference_chosen_logps' / '_rejected_logps' [B] when it
  carries them (precomputed, lepton_jax/dpo_reference.py), the frozen model's otherwise.
  """
  logps_B = pair_logps(policy, batch, loss)
  if 'reference_chosen_logps' in batch:
    reference_B = jnp.concatenate([batch['reference_chosen_logps'],
                                   batch['reference_rejected_logps']])
  elif frozen is None:
    raise ValueError('config.dpo.precompute_ref_log_probs=True, but this batch carries no '
                     "'reference_chosen_logps': build its data with dpo_reference.precompute")
  else:
    reference_B = pair_logps(frozen, batch, loss)
  reference_B = jax.lax.stop_gradient(reference_B)
  chosen_B, rejected_B = jnp.split(logps_B, 2)
  loss_B, chosen_reward_B, rejected_reward_B = dpo_losses(
      chosen_B, rejected_B, *jnp.split(reference_B, 2), loss=loss, beta=beta,
      label_smoothing=label_smoothing)
  mask_B = batch['mask']
  total = lambda x_B: jnp.sum(x_B * mask_B)
  return total(loss_B), {
      'pairs': jnp.sum(mask_B), 'rewards/chosen': total(chosen_reward_B),
      'rewards/rejected': total(rejected_reward_B),
      'rewards/accuracies': total((chosen_reward_B > rejected_reward_B).astype(jnp.float32)),
      'rewards/margins': total(chosen_reward_B - rejected_reward_B),
      'logps/chosen': total(chosen_B), 'logps/rejected': total(rejected_B)}


REFERENCE = 'reference'  # The frozen collection holding DPO's reference when the model trains.


def reference_model(model):
  """The model DPO's reference runs as: with LoRA adapters, the same Transformer without them
  (applied to the same variables, it reads only the base); otherwise `model` itself."""
  cfg = model.cfg
  if cfg.lora.enabled:
    return type(model)(dataclasses.replace(cfg, lora=type(cfg.lora)()))
  return model


def dpo(model, loss: str = 'sigmoid', beta: float = 0.1, label_smoothing: float = 0.0,
        precompute_ref_log_probs: bool = False) -> Objective:
  """DPO against a frozen reference: the starting policy. With LoRA adapters that is the same
  base with the adapters switched off (reference_model: nothing is copied); otherwise a copy of
  the starting params, kept in the frozen collection REFERENCE, unless the reference log-probs
  are precomputed into the batches (`precompute_ref_log_probs`): then no copy is kept."""
  settings = functools.partial(preference, loss=loss, beta=beta, label_smoothing=label_smoothing)
  if model.cfg.lora.enabled:
    base = reference_model(model)
    frozen_model = lambda variables: _forward(base, jax.lax.stop_gradient(variables))
    return Objective(settings, 'pairs', DPO_METRICS, frozen_model)
  if precompute_ref_log_probs:
    return Objective(settings, 'pairs', DPO_METRICS)
  frozen_model = lambda variables: _forward(model, jax.lax.stop_gradient(
      {'params': variables[REFERENCE], **{k: v for k, v in variables.items()
                                          if k not in ('params', REFERENCE)}}))
  return Objective(settings, 'pairs', DPO_METRICS, frozen_model, params_copy=REFERENCE)


def _forward(model, variables: dict) -> Forward:
  def forward(tokens_BT, positions_BT=None, segment_ids_BT=None):
    return model.apply(variables, tokens_BT, positions_BT, segment_ids_BT=segment_ids_BT)
  return forward


def from_config(config: ml_collections.ConfigDict, model) -> Objective:
  """The objective `config.objective` names, with its settings from the config; `model` (the
  Transformer being trained) is what a frozen model is derived from."""
  if config.objective in ('lm', 'sft'):
    return lm(config.z_loss)
  if config.objective == 'distill':
    # pylint: disable-next=g-import-not-at-top  (lepton_jax.distill imports this module)
    from lepton_jax import distill as distill_teacher
    d = config.distill
    return distill(distill_teacher.teacher_model(config, model.cfg), d.temperature, d.alpha,
                   d.top_k, config.z_loss)
  if config.objective == 'classify':
    return classify()
  if config.objective == 'dpo':
    d = config.dpo
    return dpo(model, d.loss, d.beta, d.label_smoothing, d.precompute_ref_log_probs)
  raise ValueError(f'config.objective={config.objective!r}: no such objective')
