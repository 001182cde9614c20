"""Tokenizers: raw UTF-8 bytes, or a SentencePiece model loaded from a file or trained on the
train split (and cached in the workdir so a restarted run reuses the same vocabulary).

Paths go through etils.epath, so models and workdirs may be local or on gs:// alike.
"""
from collections.abc import Sequence
import hashlib
import io
import json
import os
import time
from typing import Protocol

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import sentencepiece as spm

from lepton_jax import paths
from lepton_jax.data import sources

# Trainer settings that keep decode(encode(text)) == text, code included: no normalization, no
# dummy leading space, runs of spaces may merge into one piece, byte pieces for characters outside
# the vocabulary. (The one exception is U+2581, SentencePiece's space marker, which decodes as a
# space.) BPE trains ~20x faster than unigram.
SPM_TRAINER_OPTIONS = dict(
    model_type='bpe',
    byte_fallback=True,
    normalization_rule_name='identity',
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    user_defined_symbols=['\n'],  # Training sentences are lines; encoded text keeps its newlines.
    max_sentence_length=1 << 16,  # In bytes; longer lines are skipped by the trainer.
    character_coverage=0.9995,
    unk_id=0,
    eos_id=1,
    bos_id=-1,
    pad_id=-1,
)


class Tokenizer(Protocol):
  """What the pipeline and samplers need: ids for text, text for ids, and a separator."""
  vocab_size: int
  eos_id: int  # Separates documents in the packed token stream.

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without an eos."""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of each text, in parallel where the tokenizer can."""

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`; eos and other control ids decode to nothing."""


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; 256 is eos."""
  vocab_size = 257
  eos_id = 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(text) for text in texts]

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if i < 256).decode('utf-8', errors='replace')


class SentencePieceTokenizer:
  """A SentencePiece model file; its eos piece separates documents."""

  def __init__(self, model_path: str):
    if not epath.Path(model_path).is_file():
      raise FileNotFoundError(f'SentencePiece model {model_path} does not exist; fix '
                              "data.tokenizer_path or set it to '' to train one.")
    self.model_path = model_path
    # From bytes: SentencePiece itself reads only local files.
    self._processor = spm.SentencePieceProcessor(
        model_proto=epath.Path(model_path).read_bytes())
    self.vocab_size = self._processor.get_piece_size()
    self.eos_id = self._processor.eos_id()
    if self.eos_id < 0:
      raise ValueError(f'SentencePiece model {model_path} has no eos piece; train it with eos_id set.')

  def encode(self, text: str) -> list[int]:
    return self._processor.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._processor.encode(list(texts))  # Multithreaded over the list.

  def decode(self, ids: Sequence[int]) -> str:
    return self._processor.decode([int(i) for i in ids])


# config.data.tokenizer -> (data config, workdir, train_if_missing) -> the tokenizer.
TOKENIZERS = {
    'sentencepiece': lambda data_config, workdir, train_if_missing: SentencePieceTokenizer(
        data_config.tokenizer_path or trained_model_path(data_config, workdir, train_if_missing)),
    'bytes': lambda *_: ByteTokenizer(),
}


def build_tokenizer(data_config: ml_collections.ConfigDict, workdir: str,
                    train_if_missing: bool = True) -> Tokenizer:
  """The configured tokenizer; trains (once per workdir) a SentencePiece model if none is given.

  With `train_if_missing=False` (using a finished run) a model the workdir lacks is an error.
  """
  if data_config.tokenizer not in TOKENIZERS:
    raise ValueError(f'data.tokenizer={data_config.tokenizer!r} is not one of {tuple(TOKENIZERS)}.')
  return TOKENIZERS[data_config.tokenizer](data_config, workdir, train_if_missing)


def trained_model_path(data_config: ml_collections.ConfigDict, workdir: str,
                       train_if_missing: bool = True) -> str:
  """The cached model for these data settings, trained now if the cache lacks it.

  In a multi-process job process 0 trains and writes it, and the others wait for it: every
  process must tokenize with the same vocabulary, and the workdir is shared.
  """
  path = epath.Path(workdir) / 'tokenizer' / (
      f'spm_v{data_config.vocab_size}_{_settings_hash(data_config)}.model')
  if not train_if_missing and not path.exists():
    raise FileNotFoundError(
        f'{path.parent} has no SentencePiece model for these data settings ({path.name}); '
        'give the data settings the run was trained with, or data.tokenizer_path.')
  if jax.process_index() == 0 and not path.exists():
    _train_sentencepiece(data_config, path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'lepton_jax: trained {path.name}')
    if not path.exists():
      raise FileNotFoundError(f'process 0 trained {path} but process {jax.process_index()} cannot '
                              'see it: every process needs the same workdir (gs:// or a shared '
                              'filesystem).')
  return os.fspath(path)


def _settings_hash(data_config: ml_collections.ConfigDict) -> str:
  """Changes whenever the training text or the trainer would."""
  settings = {key: data_config[key] for key in (
      'source', 'path', 'tfds_name', 'tfds_data_dir', 'train_split', 'text_key', 'val_fraction',
      'vocab_size', 'spm_train_chars')}
  settings['source_name'] = sources.describe_source(data_config)
  settings['trainer'] = SPM_TRAINER_OPTIONS
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _train_sentencepiece(data_config: ml_collections.ConfigDict, path: epath.Path) -> None:
  start = time.time()
  documents = sources.load_documents(data_config, 'train')
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=_training_lines(documents, data_config.spm_train_chars),
      model_writer=model,
      vocab_size=data_config.vocab_size,
      num_threads=os.cpu_count(),
      minloglevel=2,
      **SPM_TRAINER_OPTIONS)
  path.parent.mkdir(parents=True, exist_ok=True)
  paths.write_atomically(path, model.getvalue())
  logging.info('Trained SentencePiece (vocab %d) in %.1fs: %s',
               data_config.vocab_size, time.time() - start, path)


def _training_lines(documents: Sequence[str], max_chars: int):
  """Lines of documents visited in a fixed shuffled order, so a cap samples the whole corpus."""
  for index in np.random.default_rng(0).permutation(len(documents)):
    text = documents[int(index)][:max_chars]
    max_chars -= len(text)
    yield from text.split('\n')
    if max_chars <= 0:
      return
