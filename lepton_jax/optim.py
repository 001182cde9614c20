"""Optimizer and learning-rate schedule from `config.optimizer`."""
import ml_collections
import optax

from lepton_jax import tree

OPTIMIZERS = ('adamw', 'adafactor', 'sgd')
SCHEDULES = ('cosine', 'linear', 'wsd')
# Param names (see lepton_jax/tree.py) that weight decay acts on: matmul kernels; with
# `decay_embeddings` the token and position tables too. Norm scales and biases never decay, and a
# new leaf (an int8 `scale`, an adapter) decays only if a pattern names it.
DECAYED = (r'(.*/)?kernel', r'(.*/)?lora_(a|b)')
EMBEDDINGS = (r'(.*/)?embedding', r'(.*/)?pos_embedding')


def make_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup, then cosine or linear decay to min_lr_ratio, or WSD (constant + cooldown)."""
  peak, floor = opt.learning_rate, opt.learning_rate * opt.min_lr_ratio
  warmup = optax.linear_schedule(0.0, peak, max(opt.warmup_steps, 1))
  decay_steps = max(total_steps - opt.warmup_steps, 1)
  if opt.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt.min_lr_ratio)
  elif opt.schedule == 'linear':
    decay = optax.linear_schedule(peak, floor, decay_steps)
  elif opt.schedule == 'wsd':
    stable_steps = max(decay_steps - opt.cooldown_steps, 0)
    decay = optax.join_schedules(
        [optax.constant_schedule(peak),
         optax.linear_schedule(peak, floor, max(opt.cooldown_steps, 1))],
        [stable_steps])
  else:
    raise ValueError(f'config.optimizer.schedule={opt.schedule!r}: expected one of {SCHEDULES}')
  return optax.join_schedules([warmup, decay], [opt.warmup_steps])


def decay_mask(params, decay_embeddings: bool):
  """True for the params that weight decay acts on, chosen by path pattern."""
  return tree.mask(params, DECAYED + (EMBEDDINGS if decay_embeddings else ()))


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int,
                   lr_ratios: tuple[tuple[tuple[str, ...], float], ...] = ()):
  """-> (optax transformation, schedule). `lr_ratios`: (param name patterns, factor) pairs that
  scale those params' learning rate (LoRA+ gives B its own)."""
  schedule = make_schedule(opt, total_steps)
  mask = lambda params: decay_mask(params, opt.decay_embeddings)
  if opt.name == 'adamw':
    core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                       weight_decay=opt.weight_decay, mask=mask)
  elif opt.name == 'adafactor':
    core = optax.adafactor(schedule, weight_decay_rate=opt.weight_decay or None,
                           weight_decay_mask=mask, multiply_by_parameter_scale=False)
  elif opt.name == 'sgd':
    core = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask),
                       optax.sgd(schedule, momentum=opt.momentum))
  else:
    raise ValueError(f'config.optimizer.name={opt.name!r}: expected one of {OPTIMIZERS}')
  clip = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm else []
  # The update is -lr * direction, so scaling it scales that param's learning rate.
  ratios = [optax.masked(optax.scale(factor), lambda params, p=patterns: tree.mask(params, p))
            for patterns, factor in lr_ratios if factor != 1.0]
  return optax.chain(*clip, core, *ratios), schedule
