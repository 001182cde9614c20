"""The jitted math of training: loss, one optimizer step (with gradient accumulation), eval.

Gradients are taken with respect to the trainable params only; the frozen variables are read.
The loss is the sum of token losses over the targets a batch's 'mask' counts (every target for
config.objective='lm', the loss tokens of task records for 'sft'), divided by how many it counts
in the whole global batch: per counted token, as TRL normalises by default, and the same number
whatever grad_accum_steps splits the batch into.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lepton_jax import tree

Batch = dict[str, jax.Array]


def model_variables(trainable, frozen) -> dict:
  """What the model is applied to: the trainable params put back among the frozen variables."""
  return tree.merge({'params': trainable}, frozen)


def token_losses(logits_BTV: jax.Array, targets_BT: jax.Array, z_loss: float):
  """Per-token cross-entropy (+ z_loss * log(Z)^2) and whether the argmax was right."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  loss_BT = log_z_BT - target_logit_BT + z_loss * jnp.square(log_z_BT)
  correct_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
  return loss_BT, correct_BT


def summed_loss(variables, model: nn.Module, batch: Batch, rng: jax.Array, z_loss: float,
                deterministic: bool):
  """Sum of token losses over the batch's mask, and (token count, correct count).

  Packed task rows carry 'positions' and 'segment_ids' (data/packing.py), which the model reads.
  """
  logits_BTV = model.apply(variables, batch['inputs'], batch.get('positions'),
                           deterministic=deterministic, rngs={'dropout': rng},
                           segment_ids_BT=batch.get('segment_ids'))
  loss_BT, correct_BT = token_losses(logits_BTV, batch['targets'], z_loss)
  mask_BT = batch['mask'] if 'mask' in batch else jnp.ones_like(loss_BT)
  return jnp.sum(loss_BT * mask_BT), (jnp.sum(mask_BT), jnp.sum(correct_BT * mask_BT))


def train_step(state, frozen, batch: Batch, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               grad_accum_steps: int, z_loss: float, skip_nonfinite: bool):
  """One optimizer update of a `train_state.TrainState` on `batch`, in micro-batches.

  metrics['nonfinite'] says whether the loss, gradient norm or update was not finite; with
  `skip_nonfinite` such a step changes nothing but the step count (config.nonfinite).
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  deterministic = model.cfg.dropout == 0.0

  def loss_of_trainable(trainable, micro: Batch, rng):
    variables = model_variables(trainable, frozen)
    return summed_loss(variables, model, micro, rng, z_loss, deterministic)

  grad_fn = jax.value_and_grad(loss_of_trainable, has_aux=True)

  def micro_grads(micro: Batch, index):
    (loss_sum, (tokens, _)), grads = grad_fn(state.trainable, micro,
                                             jax.random.fold_in(rng, index))
    return grads, loss_sum, tokens

  if grad_accum_steps == 1:
    grads, loss_sum, tokens = micro_grads(batch, 0)
  else:
    # [B, ...] -> [A, B/A, ...]; scan sums per-micro-batch gradients in f32.
    micro_batches = jax.tree.map(
        lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

    def accumulate(carry, indexed_micro):
      index, micro = indexed_micro
      new = micro_grads(micro, index)
      return jax.tree.map(jnp.add, carry, new), None

    zeros = (jax.tree.map(jnp.zeros_like, state.trainable), jnp.float32(0), jnp.float32(0))
    (grads, loss_sum, tokens), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(grad_accum_steps), micro_batches))

  tokens = jnp.maximum(tokens, 1.0)  # A batch counting no token gets zero gradients, not NaN.
  grads = jax.tree.map(lambda g: g / tokens, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  loss, grad_norm = loss_sum / tokens, optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
  trainable = optax.apply_updates(state.trainable, updates)
  if skip_nonfinite:  # Keep the state as it was. (Without, the loop stops before saving it.)
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    trainable, opt_state = keep_old((trainable, opt_state), (state.trainable, state.opt_state))
  metrics = {'train/loss': loss, 'train/grad_norm': grad_norm,
             'learning_rate': schedule(state.step), 'nonfinite': ~finite}
  return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


def eval_step(variables, batch: Batch, *, model: nn.Module):
  """Sums for one eval batch: (loss sum, token count, correct count)."""
  loss_sum, (tokens, correct) = summed_loss(variables, model, batch, jax.random.key(0), 0.0,
                                            True)
  return {'loss_sum': loss_sum, 'tokens': tokens, 'correct': correct}
