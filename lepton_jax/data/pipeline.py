"""Input pipeline: tokenize documents, pack them into rows, shuffle, batch, share out per process.

The token stream is every document followed by eos (and preceded by bos, for tokenizers with one).
With T = seq_len, row r is the window stream[r*T : r*T + T + 1]: inputs are its first T tokens and
targets its last T, so neighbouring rows share one token and every token of the stream is a target
exactly once.

Training visits rows in grain's index shuffle, reseeded every epoch: the batch at step s is a pure
function of (seed, s), so an iterator's checkpointable state is just its position. Every process
computes the same global batch of row ids and gathers only its own slice of them.

With `data.streaming` nothing is tokenized up front (for corpora that do not fit in memory):
documents are shuffled, each process reads every process_count-th of them, and threads tokenize
them ahead of training; grain packs the token stream into rows of T + 1 tokens and shuffles the
rows within windows of `data.shuffle_window` (consecutive rows of one long document would
otherwise share a batch). The iterator's state is then the document position, the partly packed
row and the place in the window, still a small JSON dict.

Task records (`data.source='jsonl'`, data/formats.py) are tokenized up front into examples and
packed into rows once (data/packing.py); training visits those rows in the same reseeded
shuffle, so resuming is exact in the same way. Their batches add 'positions' (restarting per
example) and, when packed, 'segment_ids'; 'mask' holds the targets config.objective trains on.

With `data.document_masking`, language-model batches add 'segment_ids' and 'positions' too, one
segment per document of a row, so attention never crosses a document boundary and rope positions
restart with every document (what MaxText and Levanter do).
"""
from collections.abc import Callable, Sequence
import time

from absl import logging
import grain
import ml_collections
import numpy as np

from lepton_jax.data import formats
from lepton_jax.data import packing
from lepton_jax.data import sources
from lepton_jax.data import tokenizers

Batch = dict[str, np.ndarray]
# Preference columns of a split -> more columns (DPO's reference log-probs, dpo_reference.py).
ColumnsFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def _token_dtype(tokenizer: tokenizers.Tokenizer):
  return np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32  # Halves memory for most vocabs.


def tokenize_documents(documents: Sequence[str], tokenizer: tokenizers.Tokenizer,
                       max_tokens: int | None = None, docs_per_call: int = 1024) -> np.ndarray:
  """One flat array of the documents' tokens in order, each document as `_document` makes it.

  With `max_tokens`, stops reading documents once that many tokens are there (and trims to it).
  """
  dtype = _token_dtype(tokenizer)
  pieces, count = [], 0
  for start in range(0, len(documents), docs_per_call):
    if max_tokens is not None and count >= max_tokens:
      break
    texts = [documents[i] for i in range(start, min(start + docs_per_call, len(documents)))]
    for ids in tokenizer.encode_batch(texts):
      pieces.append(_document(tokenizer, ids, dtype))
      count += len(pieces[-1])
  return np.concatenate(pieces)[:max_tokens]


def _document(tokenizer: tokenizers.Tokenizer, ids: list[int], dtype) -> np.ndarray:
  """One document of the stream: bos (where the tokenizer has one), its text's ids, eos."""
  return np.asarray(tokenizers.document_start(tokenizer) + ids + [tokenizer.eos_id], dtype)


def _tokenize_split(data_config: ml_collections.ConfigDict, split: str,
                    tokenizer: tokenizers.Tokenizer, max_tokens: int | None = None) -> np.ndarray:
  start = time.time()
  tokens = tokenize_documents(sources.load_documents(data_config, split), tokenizer, max_tokens)
  logging.info('Tokenized %d %s tokens in %.1fs; unigram entropy %.3f nats (the loss of a model '
               'that ignores context).', len(tokens), split, time.time() - start,
               unigram_entropy(tokens))
  return tokens


def unigram_entropy(tokens: np.ndarray) -> float:
  """Entropy in nats of the tokens' empirical frequencies."""
  counts = np.bincount(tokens)
  p = counts[counts > 0] / len(tokens)
  return float(-np.sum(p * np.log(p)))


def _local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} does not divide among {process_count} processes; '
                     'make it a multiple of the process count.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is outside [0, {process_count}).')
  return batch_size // process_count


def _windows(stream: np.ndarray, row_ids: np.ndarray, seq_len: int) -> np.ndarray:
  """[len(row_ids), seq_len + 1]: row r is stream[r*seq_len : r*seq_len + seq_len + 1]."""
  return stream[row_ids[:, None] * seq_len + np.arange(seq_len + 1)]


def _rows_to_batch(rows_RL: np.ndarray, document_eos: int | None = None) -> Batch:
  """{'inputs', 'targets'}; with `document_eos` (data.document_masking: the eos id) also the
  rows' 'segment_ids' and 'positions', one segment per document (packing.document_segments)."""
  rows_RL = rows_RL.astype(np.int32)
  batch = {'inputs': rows_RL[:, :-1], 'targets': rows_RL[:, 1:]}
  if document_eos is not None:
    batch['segment_ids'], batch['positions'] = packing.document_segments(batch['inputs'],
                                                                         document_eos)
  return batch


def _document_eos(config: ml_collections.ConfigDict,
                  tokenizer: tokenizers.Tokenizer) -> int | None:
  return tokenizer.eos_id if config.data.get('document_masking', False) else None


def make_train_iterator(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer,
                        process_index: int, process_count: int,
                        reference_logps: ColumnsFn | None = None) -> grain.DatasetIterator:
  """Endless shuffled batches of this process's share: {'inputs', 'targets'}: int32[B_local, T].

  The iterator's get_state() / set_state() save and restore its position (a small JSON dict).
  `reference_logps(columns) -> columns` (dpo_reference.precompute) adds DPO's reference
  log-probs to each preference pair.
  """
  local_batch_size = _local_batch_size(config.batch_size, process_index, process_count)
  if config.data.streaming:
    return _JsonStateIterator(iter(_streamed_batches(config, tokenizer, process_index,
                                                     process_count, local_batch_size)))
  seq_len = config.seq_len
  if config.data.source == 'jsonl':
    rows = _task_rows(config, tokenizer, 'train', reference_logps)
    num_rows, rows_to_batch = _num_rows(rows), lambda row_ids: _task_batch(config, rows, row_ids)
  else:
    tokens = _tokenize_split(config.data, 'train', tokenizer)
    num_rows = (len(tokens) - 1) // seq_len
    rows_to_batch = lambda row_ids: _rows_to_batch(_windows(tokens, row_ids, seq_len),
                                                   _document_eos(config, tokenizer))
    if not num_rows:
      raise ValueError(f'The train split of {sources.describe_source(config.data)} has only '
                       f'{len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; '
                       'add text or lower seq_len.')
  first = process_index * local_batch_size

  def local_batch(global_row_ids: np.ndarray) -> Batch:
    return rows_to_batch(global_row_ids[first:first + local_batch_size])

  dataset = (grain.MapDataset.range(num_rows)
             .shuffle(seed=config.seed)
             .repeat()  # Each epoch reshuffles with a seed derived from (seed, epoch).
             # An endless stream has no remainder; True only keeps grain's len() from overflowing.
             .batch(config.batch_size, drop_remainder=True)
             .map(local_batch))
  # A thread gathers the next few batches while the accelerator runs; batches are cheap.
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def _task_rows(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer, split: str,
               reference_logps: ColumnsFn | None = None) -> packing.Rows | dict[str, np.ndarray]:
  """The records of `split`, tokenized and packed (or padded) into rows of seq_len pairs; for
  classification and preference records, arrays with a row per record (_record_columns), and
  the columns `reference_logps` computes from those."""
  if config.data.format in ('classification', 'preference'):
    columns = _record_columns(config, tokenizer, split)
    return dict(columns, **reference_logps(columns)) if reference_logps else columns
  start = time.time()
  examples = [formats.encode(record, config.data.format, tokenizer)
              for record in formats.load_records(config.data, split)]
  rows = packing.pack(examples, config.seq_len, config.data.packing, config.data.truncate,
                      tokenizer.eos_id)
  logging.info('Tokenized %d %s records in %.1fs.', len(examples), split, time.time() - start)
  packing.log_stats(rows, len(examples), split, config.data.truncate)
  return rows


def _num_rows(rows: packing.Rows | dict[str, np.ndarray]) -> int:
  return len(next(iter(rows.values()))) if isinstance(rows, dict) else len(rows)


def _task_batch(config: ml_collections.ConfigDict, rows: packing.Rows | dict,
                row_ids: np.ndarray) -> Batch:
  """Rows `row_ids` as a batch; row id -1 is a row of padding (the end of a short eval split)."""
  real = row_ids >= 0
  take = lambda array: np.where(real.reshape(-1, *[1] * (array.ndim - 1)),
                                array[np.maximum(row_ids, 0)], 0)
  if isinstance(rows, dict):  # classification and preference: one example (or pair) per row.
    return {**{k: take(v) for k, v in rows.items()}, 'mask': real.astype(np.float32)}
  segment_ids = take(rows.segment_ids)
  targets = take(rows.loss_mask) if config.objective == 'sft' else segment_ids > 0
  batch = {'inputs': take(rows.inputs), 'targets': take(rows.targets),
           'positions': take(rows.positions), 'mask': targets.astype(np.float32)}
  if config.data.packing:
    batch['segment_ids'] = segment_ids
  return batch


def _record_columns(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer,
                    split: str) -> dict[str, np.ndarray]:
  """A row per record, right-padded to seq_len and cut as data.truncate says (and counted).

  classification: 'inputs' [R, T] padded with the classify head's pad id, 'labels' [R].
  preference: 'chosen_' and 'rejected_' + 'inputs', 'targets', 'positions' [R, T] and
  'loss_mask' (the completion's targets), as unpacked sft rows.
  """
  records = formats.load_records(config.data, split)
  seq_len, side = config.seq_len, config.data.truncate
  if config.data.format == 'classification':
    pad_id = tokenizers.pad_id(config.model.pad_id, tokenizer)
    inputs, labels, cut = np.full((len(records), seq_len), pad_id, np.int32), [], 0
    for row, record in enumerate(records):
      ids, label = formats.encode_classification(record, tokenizer, config.data.labels)
      cut += len(ids) > seq_len
      ids = ids[:seq_len] if side == 'right' else ids[-seq_len:]
      inputs[row, :len(ids)] = ids
      labels.append(label)
    if cut:
      logging.warning('%s: %d of %d records were longer than seq_len=%d ids and were cut from '
                      'the %s (data.truncate)', split, cut, len(records), seq_len, side)
    return {'inputs': inputs, 'labels': np.asarray(labels, np.int32)}
  pairs = [formats.encode_preference(record, tokenizer) for record in records]
  columns = {}
  for index, name in enumerate(('chosen', 'rejected')):
    rows = packing.pack([pair[index] for pair in pairs], seq_len, False, side, tokenizer.eos_id)
    packing.log_stats(rows, len(pairs), f'{split} {name}', side)
    columns.update({f'{name}_inputs': rows.inputs, f'{name}_targets': rows.targets,
                    f'{name}_positions': rows.positions,
                    f'{name}_loss_mask': rows.loss_mask.astype(np.float32)})
  return columns


def _streamed_batches(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer,
                      process_index: int, process_count: int,
                      local_batch_size: int) -> grain.IterDataset:
  """This process's batches, tokenized and packed as they are read (see the module docstring).

  Rows do not overlap: each holds T + 1 tokens, inputs the first T and targets the last T.
  """
  documents = sources.load_documents(config.data, 'train')
  dtype = _token_dtype(tokenizer)

  def tokenize(text: str) -> dict[str, np.ndarray]:
    return {'tokens': _document(tokenizer, tokenizer.encode(text), dtype)}

  process_documents = (grain.MapDataset.source(documents)
                       .shuffle(seed=config.seed)
                       .repeat()  # Reshuffled every epoch, as the in-memory rows are.
                       [process_index::process_count]
                       .map(tokenize))
  read_options = grain.ReadOptions(num_threads=config.data.read_threads,
                                   prefetch_buffer_size=4 * config.data.read_threads)
  rows = grain.experimental.ConcatThenSplitIterDataset(
      process_documents.to_iter_dataset(read_options),
      length_struct={'tokens': config.seq_len + 1})
  if config.data.shuffle_window:
    rows = grain.experimental.WindowShuffleIterDataset(
        rows, window_size=config.data.shuffle_window, seed=config.seed)
  batches = rows.batch(local_batch_size, drop_remainder=True).map(
      lambda packed: _rows_to_batch(packed['tokens'], _document_eos(config, tokenizer)))
  return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=4)


class _JsonStateIterator(grain.DatasetIterator):
  """A grain iterator whose state restores exactly after a JSON round trip (as in checkpoints).

  grain's ConcatThenSplit packer (0.2.18) tells "no partly packed row" by comparing its saved
  `remainder_slices` with the tuple (-1, -1); JSON gives back lists, which would restore a wrong
  row. The slices are made tuples again before the state reaches grain.
  """

  def __next__(self) -> Batch:
    return next(self._parent)

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(_with_tuple_slices(state))


def _with_tuple_slices(state):
  if not isinstance(state, dict):
    return state
  return {key: ({feature: tuple(bounds) for feature, bounds in value.items()}
                if key == 'remainder_slices' else _with_tuple_slices(value))
          for key, value in state.items()}


def make_eval_batches(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer,
                      process_index: int, process_count: int,
                      reference_logps: ColumnsFn | None = None) -> list[Batch]:
  """The first eval_batches batches of the eval split, in order, with a float32 'mask'.

  A short split gives fewer batches, never none: the last one is padded with mask 0. Only the
  documents these batches need are tokenized. `reference_logps`: as make_train_iterator's.
  """
  local_batch_size = _local_batch_size(config.batch_size, process_index, process_count)
  seq_len, batch_size = config.seq_len, config.batch_size
  if config.data.source == 'jsonl':
    rows = _task_rows(config, tokenizer, 'eval', reference_logps)
    num_batches = max(1, min(config.eval_batches, -(-_num_rows(rows) // batch_size)))
    row_ids = np.arange(num_batches * batch_size)
    row_ids = np.where(row_ids < _num_rows(rows), row_ids, -1).reshape(num_batches, batch_size)
    first = process_index * local_batch_size
    return [_task_batch(config, rows, ids[first:first + local_batch_size]) for ids in row_ids]
  tokens = _tokenize_split(config.data, 'eval', tokenizer,
                           max_tokens=config.eval_batches * batch_size * seq_len + 1)
  full_batches = (len(tokens) - 1) // seq_len // batch_size
  num_batches = max(1, min(config.eval_batches, full_batches))

  stream = np.full(num_batches * batch_size * seq_len + 1, tokenizer.eos_id, tokens.dtype)
  stream[:len(tokens)] = tokens[:len(stream)]
  is_real = (np.arange(len(stream)) < len(tokens)).astype(np.float32)
  batches = []
  for index in range(num_batches):
    first = index * batch_size + process_index * local_batch_size
    row_ids = np.arange(first, first + local_batch_size)
    batch = _rows_to_batch(_windows(stream, row_ids, seq_len), _document_eos(config, tokenizer))
    batch['mask'] = _windows(is_real, row_ids, seq_len)[:, 1:]  # Is each target real text?
    batches.append(batch)
  return batches
