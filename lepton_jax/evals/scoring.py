"""Log-likelihood scoring of token sequences, batched into a few padded shapes.

A request is (context ids, continuation ids): the score is the sum of log p(continuation token |
everything before it), and whether greedy decoding would have produced the continuation. Text
becomes requests as lm-evaluation-harness makes them (`encode_pair`), so lepton's own tasks and
its lm-eval model score the same text the same way. A context longer than the model's window
loses its oldest tokens; a continuation longer than it is scored in windows (`windows`), which
is how whole documents are scored: ([prefix_id], their tokens).

Rows are right-padded (invisible to causal attention) to the next power of two, and batches
padded to a fixed row count: a whole task compiles once per length bucket, not per request.
"""
from collections.abc import Sequence
import functools

import flax.linen as nn
import jax
import numpy as np

from lepton_jax import objectives, sharding
from lepton_jax.data import tokenizers

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)
MIN_BUCKET = 16


def prefix_id(tokenizer: tokenizers.Tokenizer) -> int:
  """What a document follows in lepton's token stream: bos where the tokenizer has one, else the
  previous document's eos. Scored text starts after it, so its first token is predicted too."""
  return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def encode_pair(tokenizer: tokenizers.Tokenizer, context: str, continuation: str) -> Request:
  """The request for `continuation` after `context`, as lm-eval's TemplateLM builds it: trailing
  spaces of the context move to the continuation, and the continuation's ids are those of the
  whole text after the context's (so a token spanning the boundary is scored with it)."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  context_ids = [prefix_id(tokenizer)] + tokenizer.encode(context)
  whole_ids = [prefix_id(tokenizer)] + tokenizer.encode(context + continuation)
  return context_ids, whole_ids[len(context_ids):]


def windows(request: Request, max_len: int) -> list[tuple[list[int], int]]:
  """(row, n) pairs, n the tokens a row scores (its last n), that score every continuation token
  once with rows of at most max_len + 1 tokens: a continuation that fits is one row after as much
  context as fits; a longer one is split into windows of max_len, each after the token before it
  and the last after as many as fill its row. For ([prefix], tokens) these are exactly lm-eval's
  loglikelihood_rolling windows (context_len=1, made disjoint)."""
  context, continuation = request
  full = list(context) + list(continuation)
  rows = []
  for start in range(0, len(continuation), max_len):
    scored = min(max_len, len(continuation) - start)
    end = len(context) + start + scored
    rows.append((full[max(0, end - max_len - 1):end], scored))
  return rows


def bucket(length: int, max_len: int) -> int:
  """The padded length of a row of `length` inputs: a power of two, at most max_len."""
  return min(max_len, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


@functools.partial(jax.jit, static_argnames='model')
def _row_scores(model: nn.Module, variables, inputs_BT, targets_BT, mask_BT):
  """(sum of target log-probs under the mask, whether every masked target is the argmax) per row."""
  loss_BT, correct_BT = objectives.token_losses(model.apply(variables, inputs_BT), targets_BT, 0.0)
  return -(loss_BT * mask_BT).sum(-1), (correct_BT | (mask_BT == 0)).all(-1)


class Scorer:
  """Scores requests with `model` on the mesh its variables live on, `batch_size` rows a call."""

  def __init__(self, model: nn.Module, mesh: jax.sharding.Mesh, rules, batch_size: int):
    self.model = model
    self.max_len = model.cfg.max_seq_len
    data_parallel = sharding.data_parallel_size(mesh, rules)
    self.batch_size = -(-batch_size // data_parallel) * data_parallel
    self._batch_sharding = sharding.batch_sharding(mesh, rules)

  def loglikelihoods(self, variables, requests: Sequence[Request]) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each request's continuation (see `windows`)."""
    rows, owners = [], []
    for index, request in enumerate(requests):
      request_rows = windows(request, self.max_len)
      rows += request_rows
      owners += [index] * len(request_rows)
    results = [(0.0, True)] * len(requests)
    for owner, (logprob, greedy) in zip(owners, self._score_rows(variables, rows)):
      results[owner] = (results[owner][0] + logprob, results[owner][1] and greedy)
    return results

  def _score_rows(self, variables,
                  rows: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # Similar lengths together.
    results = [None] * len(rows)
    for first in range(0, len(order), self.batch_size):
      chunk = order[first:first + self.batch_size]
      length = bucket(len(rows[chunk[0]][0]) - 1, self.max_len)
      inputs_BT = np.zeros((self.batch_size, length), np.int32)
      targets_BT = np.zeros_like(inputs_BT)
      mask_BT = np.zeros(inputs_BT.shape, np.float32)
      for b, i in enumerate(chunk):
        row, scored = rows[i]
        inputs_BT[b, :len(row) - 1], targets_BT[b, :len(row) - 1] = row[:-1], row[1:]
        mask_BT[b, len(row) - 1 - scored:len(row) - 1] = 1.0
      logprob_B, greedy_B = jax.device_get(_row_scores(
          self.model, variables, *(self._global(x) for x in (inputs_BT, targets_BT, mask_BT))))
      for b, i in enumerate(chunk):
        results[i] = (float(logprob_B[b]), bool(greedy_B[b]))
    return results

  def _global(self, array: np.ndarray) -> jax.Array:
    """A batch every process holds whole, as one array split over the mesh."""
    return jax.make_array_from_callback(array.shape, self._batch_sharding, lambda i: array[i])
