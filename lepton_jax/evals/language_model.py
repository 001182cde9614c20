"""Language modelling on a data source: loss, perplexity, token accuracy and bits per byte.

Loss and perplexity are per token, so they depend on the tokenizer; bits per byte divides the
same total by the UTF-8 bytes of the text the scored tokens spell, which makes models with
different vocabularies comparable:

  bits_per_byte = (sum of per-token losses in nats) / ln 2 / (UTF-8 bytes of that text)

The batches are the eval split's first `batches` batches as the pipeline packs them
(data.make_eval_batches), the ones training has always evaluated on.
"""
import functools
import math

import jax
import ml_collections
import numpy as np

from lepton_jax import data, sharding, steps


def scored_bytes(batches: list[dict[str, np.ndarray]], tokenizer: data.Tokenizer) -> int:
  """UTF-8 bytes of the text the masked targets spell, read in stream order.

  Rows are consecutive windows of one token stream, so their targets concatenate back into it;
  eos (and other control ids) decode to no bytes.
  """
  ids = np.concatenate([b['targets'][b['mask'] > 0] for b in batches])
  return len(tokenizer.decode(ids.tolist()).encode('utf-8'))


def bits_per_byte(loss_sum_nats: float, num_bytes: int) -> float:
  return loss_sum_nats / math.log(2) / max(num_bytes, 1)


class LanguageModel:
  """Evaluates on `config`'s data (`data_overrides` changed) with the run's tokenizer."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: data.Tokenizer, model,
               mesh: jax.sharding.Mesh, rules, data_overrides: dict | None = None,
               batches: int | None = None):
    eval_config = ml_collections.ConfigDict(config.to_dict())
    eval_config.data.update(data_overrides or {})
    eval_config.eval_batches = batches or config.eval_batches
    # Every process builds the global batches (to count their bytes) and keeps its own rows.
    global_batches = data.make_eval_batches(eval_config, tokenizer, 0, 1)
    self.num_bytes = scored_bytes(global_batches, tokenizer)
    rows = config.batch_size // jax.process_count()
    first = jax.process_index() * rows
    self._batches = [{k: v[first:first + rows] for k, v in batch.items()}
                     for batch in global_batches]
    self._batch_sharding = sharding.batch_sharding(mesh, rules)
    self._eval_fn = jax.jit(functools.partial(steps.eval_step, model=model),
                            out_shardings=sharding.replicated(mesh))

  def __call__(self, variables) -> dict[str, float]:
    totals = {'loss_sum': 0.0, 'tokens': 0.0, 'correct': 0.0}
    for batch in self._batches:
      sums = self._eval_fn(variables, {
          k: jax.make_array_from_process_local_data(self._batch_sharding, v)
          for k, v in batch.items()})
      totals = {k: totals[k] + float(sums[k]) for k in totals}
    loss = totals['loss_sum'] / max(totals['tokens'], 1.0)
    return {'loss': loss, 'perplexity': float(np.exp(loss)),
            'accuracy': totals['correct'] / max(totals['tokens'], 1.0),
            'bits_per_byte': bits_per_byte(totals['loss_sum'], self.num_bytes)}
