"""DPO's reference log-probs, computed once before training (config.dpo.precompute_ref_log_probs).

The reference is the starting policy (objectives.reference_model: with LoRA the base without its
adapters). Instead of running it beside the policy in every step, one jitted pass over the
preference pairs of a split, in batches of config.batch_size on the run's mesh, gives each pair's
'reference_chosen_logps' and 'reference_rejected_logps'; the data pipeline adds them as columns
of the split's rows, so every batch carries its own (data/pipeline.py), and the step reads them
instead of a reference model (objectives.preference).

Nothing is saved: a resumed run rebuilds its starting variables (train_state.start_variables,
from config.init_from and the seed) and recomputes the same values with the same programs, so
the resumed steps are those an uninterrupted run takes.
"""
from collections.abc import Callable
import jax
import numpy as np

from lepton_jax import objectives, sharding

Columns = dict[str, np.ndarray]
KEYS = ('reference_chosen_logps', 'reference_rejected_logps')


def precompute(model, variables: dict, loss: str, batch_size: int, mesh: jax.sharding.Mesh,
               rules) -> Callable[[Columns], Columns]:
  """`log_probs(columns) -> {KEYS: float32 [R]}` for the preference columns of a split (the
  pipeline's: chosen_ and rejected_ inputs, targets, positions, loss_mask [R, T]), the reference
  of `model` applied to the starting `variables` (IPO's log-probs averaged per token, as
  the loss reads them). Every process holds all R rows and gets all R values."""
  forward_model = objectives.reference_model(model)

  def pair_logps(variables, batch):
    forward = lambda tokens_BT, positions_BT: forward_model.apply(variables, tokens_BT,
                                                                  positions_BT)
    return objectives.pair_logps(forward, batch, loss)

  batch_sharding = sharding.batch_sharding(mesh, rules)
  step = jax.jit(pair_logps, out_shardings=sharding.replicated(mesh))
  rows = batch_size // jax.process_count()
  first = jax.process_index() * rows

  def log_probs(columns: Columns) -> Columns:
    pairs = {k: v for k, v in columns.items() if k.startswith(('chosen_', 'rejected_'))}
    count = len(pairs['chosen_inputs'])
    padded = -(-count // batch_size) * batch_size  # Padding rows: zeros, their values dropped.
    pairs = {k: np.pad(v, [(0, padded - count)] + [(0, 0)] * (v.ndim - 1))
             for k, v in pairs.items()}
    chosen, rejected = [], []
    for start in range(0, padded, batch_size):
      batch = {k: jax.make_array_from_process_local_data(
          batch_sharding, v[start + first:start + first + rows]) for k, v in pairs.items()}
      chosen_B, rejected_B = np.split(np.asarray(step(variables, batch)), 2)
      chosen.append(chosen_B)
      rejected.append(rejected_B)
    return {KEYS[0]: np.concatenate(chosen)[:count], KEYS[1]: np.concatenate(rejected)[:count]}

  return log_probs

