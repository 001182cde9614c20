"""The jitted math of training: loss, one optimizer step (with gradient accumulation), eval.

Gradients are taken with respect to the trainable params only; the frozen variables are read.
What the step minimises is an `objectives.Objective` (config.objective): the sum of its
per-unit losses over the batch (tokens the batch's 'mask' counts for lm and sft), divided by how
many units it counts in the whole global batch: per counted token for sft, as TRL normalises by
default, and the same number whatever grad_accum_steps splits the batch into.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lepton_jax import objectives, tree

Batch = dict[str, jax.Array]


def model_variables(trainable, frozen) -> dict:
  """What the model is applied to: the trainable params put back among the frozen variables."""
  return tree.merge({'params': trainable}, frozen)


def summed_loss(variables, model: nn.Module, batch: Batch, rng: jax.Array,
                objective: objectives.Objective, deterministic: bool):
  """The objective's (loss sum, sums) on one batch, the model applied to `variables`."""
  def policy(tokens_BT, positions_BT=None, segment_ids_BT=None):
    return model.apply(variables, tokens_BT, positions_BT, deterministic=deterministic,
                       rngs={'dropout': rng}, segment_ids_BT=segment_ids_BT)

  frozen = objective.frozen_model(variables) if objective.frozen_model else None
  return objective.loss(policy, frozen, batch)


def train_step(state, frozen, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               grad_accum_steps: int, objective: objectives.Objective, skip_nonfinite: bool,
               penalty=None):
  """One optimizer update of a `train_state.TrainState` on `batch`, in micro-batches.

  `penalty(trainable) -> scalar` (experiment.penalty: a method's regulariser) joins the loss per
  counted token once per step, not per micro-batch; train/loss stays the language-model loss.

  metrics['nonfinite'] says whether the loss, gradient norm or update was not finite; with
  `skip_nonfinite` such a step changes nothing but the step count (config.nonfinite).
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  deterministic = model.cfg.dropout == 0.0

  def loss_of_trainable(trainable, micro: Batch, rng):
    variables = model_variables(trainable, frozen)
    return summed_loss(variables, model, micro, rng, objective, deterministic)

  grad_fn = jax.value_and_grad(loss_of_trainable, has_aux=True)

  def micro_grads(micro: Batch, index):
    (loss_sum, sums), grads = grad_fn(state.trainable, micro, jax.random.fold_in(rng, index))
    return grads, loss_sum, sums

  if grad_accum_steps == 1:
    grads, loss_sum, sums = micro_grads(batch, 0)
  else:
    # [B, ...] -> [A, B/A, ...]; scan sums per-micro-batch gradients and sums in f32.
    micro_batches = jax.tree.map(
        lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

    def accumulate(carry, indexed_micro):
      index, micro = indexed_micro
      new = micro_grads(micro, index)
      return jax.tree.map(jnp.add, carry, new), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro_grads, jax.tree.map(
        lambda x: x[0], micro_batches), 0))
    (grads, loss_sum, sums), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(grad_accum_steps), micro_batches))

  # A batch counting nothing gets zero gradients, not NaN.
  count = jnp.maximum(sums[objective.count], 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  penalty_metrics = {}
  if penalty is not None:
    penalty_value, penalty_grads = jax.value_and_grad(penalty)(state.trainable)
    grads = jax.tree.map(jnp.add, grads, penalty_grads)
    penalty_metrics['train/penalty'] = penalty_value
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  metrics = objective.metrics(loss_sum, sums, 'train/')
  grad_norm = optax.tree.norm(grads)
  finite = (jnp.isfinite(metrics['train/loss']) & jnp.isfinite(grad_norm) &
            jnp.isfinite(optax.tree.norm(updates)))
  trainable = optax.apply_updates(state.trainable, updates)
  if skip_nonfinite:  # Keep the state as it was. (Without, the loop stops before saving it.)
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    trainable, opt_state = keep_old((trainable, opt_state), (state.trainable, state.opt_state))
  metrics.update({'train/grad_norm': grad_norm, 'learning_rate': schedule(state.step),
                  'nonfinite': ~finite, **penalty_metrics})
  return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


def eval_step(variables, batch: Batch, *, model: nn.Module,
              objective: objectives.Objective = objectives.lm()):
  """Sums for one eval batch: {'loss_sum', and the objective's sums} ('tokens' and 'correct'
  for lm and sft)."""
  loss_sum, sums = summed_loss(variables, model, batch, jax.random.key(0), objective, True)
  return {'loss_sum': loss_sum, **sums}
