"""Text sources, each split into train and eval documents (sequences of strings).

stdlib: the .py files of the running interpreter's standard library, split by file.
text:   a file, a directory or a glob, local or gs://; every file is split head (train) / tail
        (eval).
jsonl:  task records (data/formats.py) in such files, split by a hash of each record.
tfds:   a prepared TFDS dataset read through `tfds.data_source` (random access, no TensorFlow).
"""
from collections.abc import Sequence
import fnmatch
import glob
import hashlib
import os
import pathlib
import sysconfig

from etils import epath
import ml_collections

from lepton_jax import paths

SPLITS = ('train', 'eval')
# config.data.source -> (data config, split) -> the documents of that split.
SOURCES = {
    'stdlib': lambda data_config, split: stdlib_documents(
        data_config.val_fraction, split, data_config.include, data_config.exclude),
    'text': lambda data_config, split: text_documents(data_config.path, data_config.val_fraction,
                                                      split),
    'jsonl': lambda data_config, split: jsonl_documents(data_config, split),
    'tfds': lambda data_config, split: tfds_documents(
        data_config.tfds_name,
        data_config.train_split if split == 'train' else data_config.eval_split,
        data_config.text_key, data_config.tfds_data_dir),
}


def load_documents(data_config: ml_collections.ConfigDict, split: str) -> Sequence[str]:
  """The documents of `split` ('train' or 'eval') of the configured source; the train split
  cleaned by data.filters (data/filters.py), when it names any."""
  if split not in SPLITS:
    raise ValueError(f'split={split!r} is not one of {SPLITS}.')
  if data_config.source not in SOURCES:
    raise ValueError(f'data.source={data_config.source!r} is not one of {tuple(SOURCES)}.')
  documents = SOURCES[data_config.source](data_config, split)
  if not any(documents):
    raise ValueError(f'{describe_source(data_config)} has no text in its {split} split; '
                     'add text or change data.val_fraction / the split names.')
  if split == 'train' and data_config.get('filters') and data_config.filters.steps:
    from lepton_jax.data import filters  # pylint: disable=g-import-not-at-top  (it imports this)
    return filters.apply(data_config, documents).documents
  return documents


def describe_source(data_config: ml_collections.ConfigDict) -> str:
  """A short name for the source, for error messages and logs."""
  if data_config.source == 'stdlib':
    return f'data.source=stdlib ({stdlib_root()})'
  if data_config.source == 'text':
    return f'data.source=text (data.path={data_config.path!r})'
  if data_config.source == 'jsonl':
    return f'data.source=jsonl (data.path={data_config.path!r}, data.format={data_config.format!r})'
  return f'data.source=tfds (data.tfds_name={data_config.tfds_name!r})'


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def stdlib_paths(val_fraction: float, split: str, include: Sequence[str] = (),
                 exclude: Sequence[str] = ()) -> list[pathlib.Path]:
  """The standard library's .py files of `split`, sorted; installed packages excluded.

  `include` (if any) and `exclude` are fnmatch patterns over paths relative to the library
  ('email/*' is the email package): a run can hold out a package family for adaptation.
  """
  root = stdlib_root()
  paths = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in ('site-packages', 'dist-packages'))
    for name in sorted(files):
      if name.endswith('.py'):
        path = pathlib.Path(directory, name)
        relative = path.relative_to(root).as_posix()
        if ((include and not any(fnmatch.fnmatch(relative, p) for p in include)) or
            any(fnmatch.fnmatch(relative, p) for p in exclude)):
          continue
        if (hash_fraction(relative) < val_fraction) == (split == 'eval'):
          paths.append(path)
  return paths


def hash_fraction(key: str) -> float:
  """A number in [0, 1) fixed by `key`: the same on every machine and Python run."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], 'big') / 2**64


def stdlib_documents(val_fraction: float, split: str, include: Sequence[str] = (),
                     exclude: Sequence[str] = ()) -> list[str]:
  documents = []
  for path in stdlib_paths(val_fraction, split, include, exclude):
    try:
      documents.append(path.read_bytes().decode('utf-8'))
    except UnicodeDecodeError:
      continue  # The test suite keeps a few deliberately mis-encoded files.
  return documents


def text_documents(path: str, val_fraction: float, split: str) -> list[str]:
  """Every matched file's first (1 - val_fraction) characters for train, the rest for eval."""
  texts = [read_utf8(file) for file in matching_files(path)]
  if not any(texts):
    raise ValueError(f'data.path={path!r}: all {len(texts)} matching files are empty.')
  documents = []
  for text in texts:
    cut = int(len(text) * (1 - val_fraction))
    documents.append(text[:cut] if split == 'train' else text[cut:])
  return documents


def jsonl_documents(data_config: ml_collections.ConfigDict, split: str) -> list[str]:
  """The text of each task record of `split` (data/formats.py), e.g. to train a tokenizer on."""
  from lepton_jax.data import formats  # pylint: disable=g-import-not-at-top  (it imports this)
  return [formats.record_text(record, data_config.format)
          for record in formats.load_records(data_config, split)]


def matching_files(path: str) -> list[str]:
  """A file, every file under a directory, or a glob's matches; local or gs:// (etils.epath)."""
  root = epath.Path(path)
  if root.is_file():
    return [path]
  if root.is_dir():
    files = [directory / name for directory, _, names in root.walk() for name in names]
  elif paths.is_remote(path):
    files = _remote_glob(path)
  else:
    files = [epath.Path(f) for f in glob.glob(path, recursive=True)]
  files = sorted(os.fspath(f) for f in files if f.is_file())
  if not files:
    raise FileNotFoundError(f'data.path={path!r} matches no file; give a file, a directory or a glob.')
  return files


def _remote_glob(pattern: str) -> list[epath.Path]:
  """Matches of a gs:// glob: the part from the first wildcard on is matched under the rest."""
  if '**' in pattern:  # One listing per directory: give the directory itself instead.
    raise ValueError(f'data.path={pattern!r}: ** globs are for local disks; on gs:// give the '
                     'directory (every file under it is read) or a glob with * only.')
  parts = pattern.split('/')
  wildcards = [i for i, part in enumerate(parts) if any(c in part for c in '*?[')]
  if not wildcards:  # Neither a file nor a directory, and no glob.
    return []
  base, rest = '/'.join(parts[:wildcards[0]]), '/'.join(parts[wildcards[0]:])
  return list(epath.Path(base).glob(rest))


def read_utf8(file: str) -> str:
  data = epath.Path(file).read_bytes()
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{file} is not UTF-8 (invalid byte at offset {e.start}); '
                     're-encode it or drop it from data.path.') from None


class TfdsText(Sequence):
  """Random access to one text feature of a TFDS data source, decoded to str."""

  def __init__(self, data_source, text_key: str):
    self._data_source = data_source
    self._text_key = text_key

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> str:
    text = self._data_source[index][self._text_key]
    return text.decode('utf-8') if isinstance(text, bytes) else text

  def __iter__(self):
    return (self[i] for i in range(len(self)))


def tfds_documents(name: str, split: str, text_key: str, data_dir: str) -> TfdsText:
  # Imported here: it is slow, and only tfds runs need it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  if len(data_source) and text_key not in data_source[0]:
    raise ValueError(f'data.text_key={text_key!r} is not a feature of tfds {name!r} split '
                     f'{split!r}; available: {sorted(data_source[0])}.')
  return TfdsText(data_source, text_key)
