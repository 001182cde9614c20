"""Input pipeline: tokenize documents, pack them into rows, shuffle, batch, share out per process.

The token stream is every document followed by eos. With T = seq_len, row r is the window
stream[r*T : r*T + T + 1]: inputs are its first T tokens and targets its last T, so neighbouring
rows share one token and every token of the stream is a target exactly once.

Training visits rows in grain's index shuffle, reseeded every epoch: the batch at step s is a pure
function of (seed, s), so an iterator's checkpointable state is just its position. Every process
computes the same global batch of row ids and gathers only its own slice of them.
"""
from collections.abc import Sequence
import time

from absl import logging
import grain
import ml_collections
import numpy as np

from lepton_jax.data import sources
from lepton_jax.data import tokenizers

Batch = dict[str, np.ndarray]


def tokenize_documents(documents: Sequence[str], tokenizer: tokenizers.Tokenizer,
                       docs_per_call: int = 1024) -> np.ndarray:
  """One flat array of every document's tokens, each document followed by eos."""
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32  # Halves memory for most vocabs.
  eos = np.array([tokenizer.eos_id], dtype)
  pieces = []
  for start in range(0, len(documents), docs_per_call):
    texts = [documents[i] for i in range(start, min(start + docs_per_call, len(documents)))]
    for ids in tokenizer.encode_batch(texts):
      pieces += [np.asarray(ids, dtype), eos]
  return np.concatenate(pieces)


def _tokenize_split(data_config: ml_collections.ConfigDict, split: str,
                    tokenizer: tokenizers.Tokenizer) -> np.ndarray:
  start = time.time()
  documents = sources.load_documents(data_config, split)
  tokens = tokenize_documents(documents, tokenizer)
  logging.info('Tokenized %d %s documents into %d tokens in %.1fs; unigram entropy %.3f nats '
               '(the loss of a model that ignores context).', len(documents), split, len(tokens),
               time.time() - start, unigram_entropy(tokens))
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


def _rows_to_batch(rows_RL: np.ndarray) -> Batch:
  rows_RL = rows_RL.astype(np.int32)
  return {'inputs': rows_RL[:, :-1], 'targets': rows_RL[:, 1:]}


def make_train_iterator(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer,
                        process_index: int, process_count: int) -> grain.DatasetIterator:
  """Endless shuffled batches of this process's share: {'inputs', 'targets'}: int32[B_local, T].

  The iterator's get_state() / set_state() save and restore its position (a small JSON dict).
  """
  local_batch_size = _local_batch_size(config.batch_size, process_index, process_count)
  seq_len = config.seq_len
  tokens = _tokenize_split(config.data, 'train', tokenizer)
  num_rows = (len(tokens) - 1) // seq_len
  if not num_rows:
    raise ValueError(f'The train split of {sources.describe_source(config.data)} has only '
                     f'{len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; '
                     'add text or lower seq_len.')
  first = process_index * local_batch_size

  def local_batch(global_row_ids: np.ndarray) -> Batch:
    row_ids = global_row_ids[first:first + local_batch_size]
    return _rows_to_batch(_windows(tokens, row_ids, seq_len))

  dataset = (grain.MapDataset.range(num_rows)
             .shuffle(seed=config.seed)
             .repeat()  # Each epoch reshuffles with a seed derived from (seed, epoch).
             # An endless stream has no remainder; True only keeps grain's len() from overflowing.
             .batch(config.batch_size, drop_remainder=True)
             .map(local_batch))
  # A thread gathers the next few batches while the accelerator runs; batches are cheap.
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def make_eval_batches(config: ml_collections.ConfigDict, tokenizer: tokenizers.Tokenizer,
                      process_index: int, process_count: int) -> list[Batch]:
  """The first eval_batches batches of the eval split, in order, with a float32 'mask'.

  A short split gives fewer batches, never none: the last one is padded with mask 0.
  """
  local_batch_size = _local_batch_size(config.batch_size, process_index, process_count)
  seq_len, batch_size = config.seq_len, config.batch_size
  tokens = _tokenize_split(config.data, 'eval', tokenizer)
  full_batches = (len(tokens) - 1) // seq_len // batch_size
  num_batches = max(1, min(config.eval_batches, full_batches))

  stream = np.full(num_batches * batch_size * seq_len + 1, tokenizer.eos_id, tokens.dtype)
  stream[:len(tokens)] = tokens[:len(stream)]
  is_real = (np.arange(len(stream)) < len(tokens)).astype(np.float32)
  batches = []
  for index in range(num_batches):
    first = index * batch_size + process_index * local_batch_size
    row_ids = np.arange(first, first + local_batch_size)
    batch = _rows_to_batch(_windows(stream, row_ids, seq_len))
    batch['mask'] = _windows(is_real, row_ids, seq_len)[:, 1:]  # Is each target real text?
    batches.append(batch)
  return batches
