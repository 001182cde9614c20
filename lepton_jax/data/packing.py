"""Task examples -> rows of seq_len (input, target) pairs, each example kept whole.

An example of n ids gives n - 1 pairs: inputs ids[:-1], targets ids[1:], loss_mask[1:], and
positions 0..n-2. One longer than seq_len + 1 ids is cut to seq_len + 1 from the side `truncate`
says ('right' keeps its start, 'left' its end) and counted, never split into two examples.

With packing, rows hold several examples, placed by best-fit decreasing (longest first, each into
the row it fills most tightly), which depends on the examples alone; segment ids number a row's
examples 1, 2, ... and 0 is padding, so attention can keep to one example (model/attention.py).
Without, each example has a row of its own, right-padded: causal attention alone keeps it apart.

Language-model rows, windows of the document stream, get the same two columns from
`document_segments` when config.data.document_masking is on.
"""
import bisect
from collections.abc import Sequence
import dataclasses

from absl import logging
import numpy as np

from lepton_jax.data import formats


@dataclasses.dataclass(frozen=True)
class Rows:
  """[R, T] arrays of packed (input, target) pairs; padding has segment 0 and no target."""
  inputs: np.ndarray  # int32
  targets: np.ndarray  # int32
  loss_mask: np.ndarray  # bool: the target is a loss token of its example.
  segment_ids: np.ndarray  # int32: 1, 2, ... per example in the row; 0 is padding.
  positions: np.ndarray  # int32: restart at 0 with every example.
  truncated: int  # Examples that were cut to fit,
  emptied: int  # and those of them left with no loss token (nothing for sft to learn).

  def __len__(self) -> int:
    return len(self.inputs)


def truncate(example: formats.Example, seq_len: int, side: str) -> formats.Example:
  """The example cut to at most seq_len + 1 ids, from the `side` end."""
  keep = slice(0, seq_len + 1) if side == 'right' else slice(-(seq_len + 1), None)
  return formats.Example(example.ids[keep], example.loss_mask[keep])


def pack(examples: Sequence[formats.Example], seq_len: int, packing: bool, side: str,
         pad_id: int) -> Rows:
  """The examples in rows of seq_len pairs (see the module docstring)."""
  cut = [truncate(e, seq_len, side) for e in examples if len(e.ids) > seq_len + 1]
  truncated, emptied = len(cut), sum(not e.loss_mask[1:].any() for e in cut)
  examples = [truncate(e, seq_len, side) for e in examples]
  lengths = [len(e.ids) - 1 for e in examples]
  rows = _best_fit(lengths, seq_len) if packing else [[i] for i in range(len(examples))]
  shape = (len(rows), seq_len)
  inputs, targets = np.full(shape, pad_id, np.int32), np.full(shape, pad_id, np.int32)
  loss_mask = np.zeros(shape, bool)
  segment_ids, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  for r, members in enumerate(rows):
    start = 0
    for segment, index in enumerate(members, start=1):
      ids, mask, end = examples[index].ids, examples[index].loss_mask, start + lengths[index]
      inputs[r, start:end], targets[r, start:end] = ids[:-1], ids[1:]
      loss_mask[r, start:end] = mask[1:]
      segment_ids[r, start:end], positions[r, start:end] = segment, np.arange(end - start)
      start = end
  return Rows(inputs, targets, loss_mask, segment_ids, positions, truncated, emptied)


def document_segments(inputs_RT: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(segment_ids, positions) int32 [R, T] of rows cut from the document stream, where every
  document ends with eos: a new segment starts after each eos (and at the row's first token, a
  document's continuation), and positions count from each segment's first token."""
  T = inputs_RT.shape[1]
  starts_RT = np.zeros(inputs_RT.shape, bool)
  starts_RT[:, 0] = True
  starts_RT[:, 1:] = inputs_RT[:, :-1] == eos_id
  segment_ids_RT = np.cumsum(starts_RT, axis=1, dtype=np.int32)
  index_T = np.arange(T, dtype=np.int32)
  start_RT = np.maximum.accumulate(np.where(starts_RT, index_T, 0), axis=1)
  return segment_ids_RT, index_T - start_RT


def _best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Rows of example indices: longest first, each into the open row it fills most tightly."""
  rows, open_rows = [], []  # open_rows: sorted (space left, row index).
  for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    length = lengths[index]
    slot = bisect.bisect_left(open_rows, (length, -1))
    if slot == len(open_rows):
      rows.append([index])
      left, row = capacity - length, len(rows) - 1
    else:
      left, row = open_rows.pop(slot)
      rows[row].append(index)
      left -= length
    if left:
      bisect.insort(open_rows, (left, row))
  return rows


def log_stats(rows: Rows, num_examples: int, split: str, side: str) -> None:
  """How full the rows are and how many examples were cut."""
  filled = float(np.mean(rows.segment_ids > 0)) if len(rows) else 0.0
  logging.info('%s: %d examples in %d rows of %d (%.1f%% of pairs real, %.1f%% loss tokens)',
               split, num_examples, len(rows), rows.inputs.shape[1], 100 * filled,
               100 * float(np.mean(rows.loss_mask)) if len(rows) else 0.0)
  if rows.truncated:
    logging.warning('%s: %d of %d examples were longer than seq_len + 1 ids and were cut from '
                    'the %s (data.truncate); %d of them kept no loss token', split,
                    rows.truncated, num_examples, side, rows.emptied)
