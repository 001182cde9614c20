"""Tokenizers: raw UTF-8 bytes; a SentencePiece model loaded from a file or trained on the train
split (and cached in the workdir so a restarted run reuses the same vocabulary); or a Hugging Face
tokenizer directory.

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
  eos_ids: tuple[int, ...]  # Every id that ends a sequence (eos_id first): generation stops at any.
  bos_id: int | None  # Starts every document in the stream, for models trained with one.
  path: str  # Its file (.model) or Hugging Face directory; '' when it has none (bytes).

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos or eos."""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of each text, in parallel where the tokenizer can."""

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`; eos and other control ids decode to nothing."""


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; 256 is eos."""
  vocab_size = 257
  eos_id = 256
  eos_ids = (256,)
  bos_id = None
  path = ''

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
    self.path = model_path
    # From bytes: SentencePiece itself reads only local files.
    self._processor = spm.SentencePieceProcessor(
        model_proto=epath.Path(model_path).read_bytes())
    self.vocab_size = self._processor.get_piece_size()
    self.eos_id = self._processor.eos_id()
    if self.eos_id < 0:
      raise ValueError(f'SentencePiece model {model_path} has no eos piece; train it with eos_id set.')
    self.eos_ids = (self.eos_id,)
    self.bos_id = None  # Documents are separated by eos alone, as lepton trains its models.

  def encode(self, text: str) -> list[int]:
    return self._processor.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._processor.encode(list(texts))  # Multithreaded over the list.

  def decode(self, ids: Sequence[int]) -> str:
    return self._processor.decode([int(i) for i in ids])


class HFTokenizer:
  """A Hugging Face tokenizer directory: tokenizer.json (read with the `tokenizers` library) or,
  failing that, tokenizer.model (SentencePiece), with bos and eos ids from its config files.

  With tokenizer.json it encodes as `transformers.AutoTokenizer(text, add_special_tokens=False)`
  does and decodes as its `decode(ids, skip_special_tokens=True)`.
  """

  def __init__(self, directory: str):
    path = _tokenizer_directory(directory)
    self.path = directory
    self._backend = _load_backend(path)
    self.vocab_size = self._backend.vocab_size
    self.bos_id, self.eos_ids = _special_ids(path, self._backend)
    self.eos_id = self.eos_ids[0]

  def encode(self, text: str) -> list[int]:
    return self._backend.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._backend.encode_batch(texts)

  def decode(self, ids: Sequence[int]) -> str:
    return self._backend.decode(ids)


class _TokenizersFile:
  """tokenizer.json, through the `tokenizers` library (the hf extra: imported only here)."""
  own_ids = {'bos': [], 'eos': []}  # tokenizer.json marks no token as bos or eos.

  def __init__(self, path: epath.Path):
    import tokenizers  # pylint: disable=g-import-not-at-top
    # From the text: the library itself reads only local files.
    self._tokenizer = tokenizers.Tokenizer.from_str(path.read_text())
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)  # Parallel.
    return [encoding.ids for encoding in encodings]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self._tokenizer.token_to_id(token)


class _SentencePieceFile:
  """tokenizer.model (Llama 2, Mistral), through SentencePiece, which knows its bos and eos."""

  def __init__(self, path: epath.Path):
    self._processor = spm.SentencePieceProcessor(model_proto=path.read_bytes())
    self.vocab_size = self._processor.get_piece_size()
    own = {'bos': self._processor.bos_id(), 'eos': self._processor.eos_id()}
    self.own_ids = {key: [i] if i >= 0 else [] for key, i in own.items()}  # -1: no such piece.

  def encode(self, text: str) -> list[int]:
    return self._processor.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._processor.encode(list(texts))  # Multithreaded over the list.

  def decode(self, ids: Sequence[int]) -> str:
    return self._processor.decode([int(i) for i in ids])  # Control pieces decode to nothing.

  def token_to_id(self, token: str) -> int | None:
    index = self._processor.piece_to_id(token)  # Unknown pieces map to unk: check the way back.
    return index if self._processor.id_to_piece(index) == token else None


def _tokenizer_directory(directory: str) -> epath.Path:
  if not directory or not epath.Path(directory).is_dir():
    raise NotADirectoryError(
        f'data.tokenizer_path={directory!r} is not a directory; data.tokenizer=hf needs a Hugging '
        'Face tokenizer directory (tokenizer.json or tokenizer.model).')
  return epath.Path(directory)


def _load_backend(path: epath.Path) -> _TokenizersFile | _SentencePieceFile:
  if (path / 'tokenizer.json').exists():
    return _TokenizersFile(path / 'tokenizer.json')
  if (path / 'tokenizer.model').exists():
    return _SentencePieceFile(path / 'tokenizer.model')
  raise FileNotFoundError(f'{path} has neither tokenizer.json nor tokenizer.model.')


def _special_ids(path: epath.Path, backend) -> tuple[int | None, tuple[int, ...]]:
  """(bos_id, eos_ids) of a Hugging Face directory.

  The first source that names an id wins: generation_config.json and config.json (the model's own
  ids, which transformers' generate stops at), then tokenizer_config.json's token strings, then a
  SentencePiece model's own pieces. eos_ids keep every eos any of them names.
  """
  bos_ids, eos_ids = _named_ids(path, backend, 'bos'), _named_ids(path, backend, 'eos')
  if not eos_ids:
    raise ValueError(f'{path} names no eos: none of generation_config.json, config.json '
                     '(eos_token_id), tokenizer_config.json (eos_token) or the tokenizer has one.')
  # GPT-2 and Qwen name their one separator as bos too; they never start documents with it.
  bos_id = bos_ids[0] if bos_ids and bos_ids[0] not in eos_ids else None
  return bos_id, eos_ids


def _named_ids(path: epath.Path, backend, key: str) -> tuple[int, ...]:
  """The `key` ('bos' or 'eos') ids the directory names, in order of precedence, each once."""
  ids = []
  for name in ('generation_config.json', 'config.json'):
    ids += _as_list(_read_json(path / name).get(f'{key}_token_id'))
  ids += _tokenizer_config_id(path, backend, key)
  return tuple(dict.fromkeys(ids + backend.own_ids[key]))


def _tokenizer_config_id(path: epath.Path, backend, key: str) -> list[int]:
  """The id of tokenizer_config.json's `{key}_token`, if it names one."""
  file = path / 'tokenizer_config.json'
  token = _read_json(file).get(f'{key}_token')
  token = token['content'] if isinstance(token, dict) else token  # An AddedToken, saved.
  if token is None:
    return []
  token_id = backend.token_to_id(token)
  if token_id is None:
    raise ValueError(f"{file}: {key}_token {token!r} is not in the tokenizer's vocabulary.")
  return [token_id]


def _as_list(value) -> list[int]:
  if value is None:
    return []
  return list(value) if isinstance(value, list) else [value]


def _read_json(path: epath.Path) -> dict:
  return json.loads(path.read_text()) if path.exists() else {}


def pad_id(configured: int, tokenizer: Tokenizer) -> int:
  """The id that pads a classify head's rows: config.model.pad_id, or (-1) the eos id."""
  return configured if configured >= 0 else tokenizer.eos_id


def document_start(tokenizer: Tokenizer) -> list[int]:
  """The ids that begin every document: [bos_id], or none for tokenizers without a bos."""
  return [] if tokenizer.bos_id is None else [tokenizer.bos_id]


# config.data.tokenizer -> (data config, workdir, train_if_missing) -> the tokenizer.
TOKENIZERS = {
    'sentencepiece': lambda data_config, workdir, train_if_missing: SentencePieceTokenizer(
        data_config.tokenizer_path or trained_model_path(data_config, workdir, train_if_missing)),
    'bytes': lambda *_: ByteTokenizer(),
    'hf': lambda data_config, *_: HFTokenizer(data_config.tokenizer_path),
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
  if data_config.get('filters') and data_config.filters.steps:  # It trains on the cleaned text.
    settings['filters'] = data_config.filters.to_dict()
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
