"""Tests of lepton_jax.data: tokenizers, sources and the packed batch pipeline (CPU, offline)."""
import json
import os

import jax
from jax.experimental import multihost_utils
import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds

from lepton_jax import config_lib
from lepton_jax import data
from lepton_jax.data import pipeline
from lepton_jax.data import sources
from lepton_jax.data import tokenizers

UNICODE_TEXT = 'naïve café ☃ 日本語 𝔘𝔫𝔦 \t tabs\r\n\n\n  trailing  \x00 end'


def make_config(**data_overrides):
  config = config_lib.base_config()
  config.seq_len = 8
  config.batch_size = 4
  config.eval_batches = 2
  config.data.update(data_overrides)
  return config


def write_corpus(tmp_path, num_files=3):
  """A directory of small text files with distinct words, and the config that reads it."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(num_files):
    words = ' '.join(f'w{i}_{j}' for j in range(60))
    (corpus / f'doc{i}.txt').write_text(f'Document {i}.\n{words}\n', encoding='utf-8')
  return make_config(source='text', path=str(corpus), tokenizer='bytes')


def stdlib_code_dir(tmp_path):
  """A few real standard-library modules, copied as a small text corpus."""
  code = tmp_path / 'code'
  code.mkdir()
  for name in ('tabnanny.py', 'textwrap.py', 'shlex.py', 'string.py', 'inspect.py', 'argparse.py',
               'functools.py'):
    (code / name).write_bytes((sources.stdlib_root() / name).read_bytes())
  return code


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# Tokenizers.


def test_bytes_tokenizer_round_trips_unicode():
  tokenizer = data.build_tokenizer(make_config(tokenizer='bytes').data, '')
  ids = tokenizer.encode(UNICODE_TEXT)
  assert (tokenizer.vocab_size, tokenizer.eos_id) == (257, 256)
  assert max(ids) < 256
  assert tokenizer.decode(ids) == UNICODE_TEXT
  assert tokenizer.decode(ids + [tokenizer.eos_id]) == UNICODE_TEXT


def test_bytes_tokenizer_decodes_invalid_utf8():
  tokenizer = tokenizers.ByteTokenizer()
  assert tokenizer.decode([0xff, 0x41, 0xe2, 0x98]) == '\ufffdA\ufffd'


@pytest.fixture(scope='module')
def spm_workdir(tmp_path_factory):
  """A workdir holding a SentencePiece model trained on real stdlib code, and its config."""
  tmp_path = tmp_path_factory.mktemp('spm')
  config = make_config(source='text', path=str(stdlib_code_dir(tmp_path)), vocab_size=600)
  data.build_tokenizer(config.data, str(tmp_path))
  return config, str(tmp_path)


def test_sentencepiece_round_trips_code_exactly(spm_workdir):
  config, workdir = spm_workdir
  tokenizer = data.build_tokenizer(config.data, workdir)
  assert tokenizer.vocab_size == 600
  for name in ('inspect.py', 'ast.py', 'email/_header_value_parser.py'):  # Seen and unseen code.
    code = (sources.stdlib_root() / name).read_text(encoding='utf-8')
    ids = tokenizer.encode(code)
    assert len(ids) < 0.6 * len(code)  # Learned merges, not bytes.
    assert tokenizer.decode(ids) == code
  for text in (UNICODE_TEXT, '\tif x:\n\t\treturn 1\n\n\n    # Ω ≠ ∞\n', ' leading space'):
    assert tokenizer.decode(tokenizer.encode(text)) == text
  assert tokenizer.eos_id not in tokenizer.encode(UNICODE_TEXT)


def test_sentencepiece_is_cached_in_workdir(spm_workdir, monkeypatch):
  config, workdir = spm_workdir
  (model_file,) = os.listdir(os.path.join(workdir, 'tokenizer'))
  assert model_file.startswith('spm_v600_') and model_file.endswith('.model')

  def fail(**kwargs):
    raise AssertionError('retrained a cached tokenizer')

  monkeypatch.setattr(spm.SentencePieceTrainer, 'train', fail)
  assert data.build_tokenizer(config.data, workdir).path.endswith(model_file)
  with pytest.raises(AssertionError, match='retrained'):  # Other settings, other model.
    data.build_tokenizer(make_config(**dict(config.data, vocab_size=500)).data, workdir)


def test_sentencepiece_training_is_deterministic(spm_workdir, tmp_path):
  config, workdir = spm_workdir
  first = data.build_tokenizer(config.data, workdir).path
  second = data.build_tokenizer(config.data, str(tmp_path)).path
  with open(first, 'rb') as a, open(second, 'rb') as b:
    assert a.read() == b.read()


def test_sentencepiece_trains_into_and_loads_from_gcs(spm_workdir, fake_gcs):
  config, workdir = spm_workdir
  trained = data.build_tokenizer(config.data, 'gs://bucket/run')
  assert trained.path.startswith('gs://bucket/run/tokenizer/spm_v600_')
  with open(data.build_tokenizer(config.data, workdir).path, 'rb') as local_model:
    assert (fake_gcs / trained.path.removeprefix('gs://')).read_bytes() == local_model.read()
  loaded = data.build_tokenizer(
      make_config(**dict(config.data, tokenizer_path=trained.path)).data, 'gs://bucket/b')
  assert loaded.encode(UNICODE_TEXT) == trained.encode(UNICODE_TEXT)
  assert not (fake_gcs / 'bucket/b').exists()


def test_a_process_that_cannot_see_the_trained_model_says_the_workdir_must_be_shared(
    spm_workdir, tmp_path, monkeypatch):
  config, _ = spm_workdir
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)  # Process 0 wrote to its own disk.
  monkeypatch.setattr(multihost_utils, 'sync_global_devices', lambda name: None)
  with pytest.raises(FileNotFoundError, match=r'process 0 trained .*spm_v600_\w+\.model but '
                     r'process 1 cannot see it: every process needs the same workdir'):
    data.build_tokenizer(config.data, str(tmp_path))


def test_sentencepiece_loads_tokenizer_path(spm_workdir, tmp_path):
  config, workdir = spm_workdir
  trained = data.build_tokenizer(config.data, workdir)
  config.data.tokenizer_path = trained.path
  loaded = data.build_tokenizer(config.data, str(tmp_path))
  assert not os.path.exists(tmp_path / 'tokenizer')
  assert loaded.encode(UNICODE_TEXT) == trained.encode(UNICODE_TEXT)
  assert loaded.eos_id == trained.eos_id


def test_missing_tokenizer_path_names_the_file(tmp_path):
  missing = str(tmp_path / 'nope.model')
  with pytest.raises(FileNotFoundError, match='nope.model'):
    data.build_tokenizer(make_config(tokenizer_path=missing).data, str(tmp_path))


def test_unknown_tokenizer_names_the_key():
  with pytest.raises(ValueError, match='data.tokenizer'):
    data.build_tokenizer(make_config(tokenizer='words').data, '')


# Sources.


def test_stdlib_split_is_by_file_disjoint_and_deterministic():
  train = sources.stdlib_paths(0.1, 'train')
  evals = sources.stdlib_paths(0.1, 'eval')
  assert train == sources.stdlib_paths(0.1, 'train')
  assert not set(train) & set(evals)
  assert 0.05 < len(evals) / (len(train) + len(evals)) < 0.15
  assert not any('site-packages' in p.parts for p in train + evals)
  assert {p.suffix for p in train} == {'.py'}
  documents = data.load_documents(make_config(val_fraction=0.1).data, 'eval')
  assert 0 < len(documents) <= len(evals)  # A few test files are deliberately not UTF-8.


def test_text_file_splits_head_and_tail(tmp_path):
  path = tmp_path / 'shakespeare.txt'
  text = ''.join(f'line {i}\n' for i in range(100))
  path.write_text(text, encoding='utf-8')
  config = make_config(source='text', path=str(path), val_fraction=0.1)
  (train,) = data.load_documents(config.data, 'train')
  (evals,) = data.load_documents(config.data, 'eval')
  assert train + evals == text
  assert len(train) == int(len(text) * 0.9)


def test_text_directory_and_glob_read_every_file_sorted(tmp_path):
  config = write_corpus(tmp_path)
  by_directory = data.load_documents(config.data, 'train')
  assert len(by_directory) == 3 and by_directory[0].startswith('Document 0.')
  config.data.path = str(tmp_path / 'corpus' / 'doc*.txt')
  assert data.load_documents(config.data, 'train') == by_directory


def test_text_on_gcs_reads_a_file_a_directory_and_a_glob(tmp_path, fake_gcs):
  local = write_corpus(tmp_path)
  bucket = fake_gcs / 'bucket'
  bucket.mkdir(parents=True)
  (tmp_path / 'corpus').rename(bucket / 'corpus')
  expected = data.load_documents(make_config(source='text', path=str(bucket / 'corpus')).data,
                                 'train')
  for path in ('gs://bucket/corpus', 'gs://bucket/corpus/doc*.txt', 'gs://bucket/*/doc?.txt'):
    assert data.load_documents(make_config(**dict(local.data, path=path)).data, 'train') == expected
  (first,) = data.load_documents(make_config(**dict(local.data, path='gs://bucket/corpus/doc0.txt'))
                                 .data, 'train')
  assert first == expected[0]
  for path, error in (('gs://bucket/corpus/missing.txt', 'matches no file'),
                      ('gs://bucket/**/doc0.txt', r'\*\* globs are for local disks')):
    with pytest.raises((FileNotFoundError, ValueError), match=error):
      data.load_documents(make_config(**dict(local.data, path=path)).data, 'train')


def test_text_errors_name_the_path(tmp_path):
  missing = str(tmp_path / 'missing*.txt')
  with pytest.raises(FileNotFoundError, match='missing'):
    data.load_documents(make_config(source='text', path=missing).data, 'train')

  (tmp_path / 'ok.txt').write_text('fine', encoding='utf-8')
  (tmp_path / 'latin1.txt').write_bytes('abc café'.encode('latin-1'))
  with pytest.raises(ValueError, match=r'latin1.txt is not UTF-8 .*offset 7'):
    data.load_documents(make_config(source='text', path=str(tmp_path)).data, 'train')

  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'a.txt').write_text('')
  with pytest.raises(ValueError, match='empty.*all 1 matching files are empty'):
    data.load_documents(make_config(source='text', path=str(empty)).data, 'train')


def test_empty_split_names_the_source(tmp_path):
  config = write_corpus(tmp_path)
  config.data.val_fraction = 0.0
  with pytest.raises(ValueError, match='data.source=text .*corpus.* eval split'):
    data.load_documents(config.data, 'eval')


def test_tfds_mock_data_source():
  config = make_config(source='tfds', tfds_name='tiny_shakespeare', text_key='text')
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    documents = data.load_documents(config.data, 'train')
    assert len(documents) == 3
    assert all(isinstance(d, str) and d for d in documents)


def fake_data_source(records_by_split):
  """An as_data_source_fn serving fixed records, shaped like real TFDS ones (text as bytes)."""
  def as_data_source(builder, split, **kwargs):
    del builder, kwargs
    return records_by_split[split]
  return as_data_source


def test_tfds_reads_text_bytes_per_split():
  records = {'train': [{'text': b'first \xe2\x98\x83'}, {'text': b'second'}],
             'test': [{'text': b'held out'}]}
  config = make_config(source='tfds', tfds_name='lm1b')
  with tfds.testing.mock_data(as_data_source_fn=fake_data_source(records)):
    assert list(data.load_documents(config.data, 'train')) == ['first ☃', 'second']
    assert list(data.load_documents(config.data, 'eval')) == ['held out']


def test_tfds_errors_name_the_key_and_source():
  config = make_config(source='tfds', tfds_name='lm1b', text_key='sentence')
  records = {'train': [{'text': b'a', 'label': 1}], 'test': [{'text': b''}]}
  with tfds.testing.mock_data(as_data_source_fn=fake_data_source(records)):
    with pytest.raises(ValueError, match=r"'sentence'.*available: \['label', 'text'\]"):
      data.load_documents(config.data, 'train')
    config.data.text_key = 'text'
    with pytest.raises(ValueError, match="tfds_name='lm1b'.* eval split"):
      data.load_documents(config.data, 'eval')


# Pipeline.


def test_tokenize_documents_appends_eos():
  tokenizer = tokenizers.ByteTokenizer()
  tokens = data.tokenize_documents(['ab', '', 'c'], tokenizer)
  np.testing.assert_array_equal(tokens, [97, 98, 256, 256, 99, 256])


def test_packing_keeps_every_token_in_order(tmp_path):
  config = write_corpus(tmp_path)
  tokenizer = data.build_tokenizer(config.data, '')
  stream = data.tokenize_documents(data.load_documents(config.data, 'eval'), tokenizer)
  batches = data.make_eval_batches(config, tokenizer, 0, 1)
  inputs = np.concatenate([b['inputs'] for b in batches])
  targets = np.concatenate([b['targets'] for b in batches])
  assert inputs.shape == targets.shape == (8, 8) and inputs.dtype == np.int32
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  np.testing.assert_array_equal(inputs.reshape(-1), stream[:64])
  np.testing.assert_array_equal(targets.reshape(-1), stream[1:65])
  assert tokenizer.eos_id in stream[:65]  # The separator after the first document.
  assert all(b['mask'].dtype == np.float32 and b['mask'].all() for b in batches)


def test_train_epoch_is_a_permutation_of_the_rows(tmp_path):
  config = write_corpus(tmp_path)
  config.data.val_fraction = 0.0
  tokenizer = data.build_tokenizer(config.data, '')
  stream = data.tokenize_documents(data.load_documents(config.data, 'train'), tokenizer)
  num_rows = (len(stream) - 1) // config.seq_len
  config.batch_size = next(b for b in (5, 4, 3, 2, 1) if num_rows % b == 0)
  epoch = take(data.make_train_iterator(config, tokenizer, 0, 1), num_rows // config.batch_size)
  inputs = np.concatenate([b['inputs'] for b in epoch])
  targets = np.concatenate([b['targets'] for b in epoch])
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  starts = [config.seq_len * r for r in range(num_rows)]
  expected = sorted(tuple(stream[s:s + config.seq_len + 1]) for s in starts)
  rows = np.concatenate([inputs, targets[:, -1:]], axis=1)
  assert sorted(map(tuple, rows)) == expected
  assert not np.array_equal(rows[:, 0], stream[starts])  # Shuffled.


def test_train_order_is_a_function_of_the_seed(tmp_path):
  config = write_corpus(tmp_path)
  tokenizer = data.build_tokenizer(config.data, '')
  first = take(data.make_train_iterator(config, tokenizer, 0, 1), 30)
  assert_same_batches(first, take(data.make_train_iterator(config, tokenizer, 0, 1), 30))
  config.seed = 1
  other = take(data.make_train_iterator(config, tokenizer, 0, 1), 30)
  assert not np.array_equal(first[0]['inputs'], other[0]['inputs'])


def test_epochs_are_reshuffled(tmp_path):
  config = write_corpus(tmp_path)
  config.batch_size = 1
  tokenizer = data.build_tokenizer(config.data, '')
  stream = data.tokenize_documents(data.load_documents(config.data, 'train'), tokenizer)
  num_rows = (len(stream) - 1) // config.seq_len
  rows = [b['inputs'][0, 0] for b in take(data.make_train_iterator(config, tokenizer, 0, 1),
                                          2 * num_rows)]
  assert sorted(rows[:num_rows]) == sorted(rows[num_rows:])
  assert rows[:num_rows] != rows[num_rows:]


def test_processes_share_the_global_batch(tmp_path):
  config = write_corpus(tmp_path)
  tokenizer = data.build_tokenizer(config.data, '')
  whole = take(data.make_train_iterator(config, tokenizer, 0, 1), 5)
  halves = [take(data.make_train_iterator(config, tokenizer, p, 2), 5) for p in range(2)]
  for step, batch in enumerate(whole):
    assert halves[0][step]['inputs'].shape == (2, config.seq_len)
    for key in batch:
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]), batch[key])
  whole_eval = data.make_eval_batches(config, tokenizer, 0, 1)
  halves_eval = [data.make_eval_batches(config, tokenizer, p, 2) for p in range(2)]
  for step, batch in enumerate(whole_eval):
    for key in batch:
      np.testing.assert_array_equal(
          np.concatenate([halves_eval[0][step][key], halves_eval[1][step][key]]), batch[key])


def test_batch_size_must_divide_among_processes(tmp_path):
  config = write_corpus(tmp_path)
  with pytest.raises(ValueError, match='batch_size=4 .* 3 processes'):
    data.make_train_iterator(config, tokenizers.ByteTokenizer(), 0, 3)


def test_resume_from_state_is_exact(tmp_path):
  config = write_corpus(tmp_path)
  tokenizer = data.build_tokenizer(config.data, '')
  iterator = data.make_train_iterator(config, tokenizer, 1, 2)
  take(iterator, 7)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = take(iterator, 40)  # Crosses epoch boundaries.
  resumed = data.make_train_iterator(config, tokenizer, 1, 2)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 40), expected)


def test_eval_batches_are_fixed_and_fewer_when_short(tmp_path):
  config = write_corpus(tmp_path)
  config.eval_batches = 100
  tokenizer = data.build_tokenizer(config.data, '')
  batches = data.make_eval_batches(config, tokenizer, 0, 1)
  stream = data.tokenize_documents(data.load_documents(config.data, 'eval'), tokenizer)
  assert len(batches) == (len(stream) - 1) // config.seq_len // config.batch_size
  assert_same_batches(batches, data.make_eval_batches(config, tokenizer, 0, 1))


def test_eval_on_tiny_split_pads_with_mask_zero(tmp_path):
  (tmp_path / 'tiny.txt').write_text('0123456789' * 3, encoding='utf-8')
  config = make_config(source='text', path=str(tmp_path / 'tiny.txt'), tokenizer='bytes')
  tokenizer = tokenizers.ByteTokenizer()
  (batch,) = data.make_eval_batches(config, tokenizer, 0, 1)
  assert batch['inputs'].shape == batch['mask'].shape == (4, 8)
  assert batch['mask'].sum() == 3  # The eval text is '789' + eos: three real targets.
  assert tokenizer.decode(batch['targets'][batch['mask'] > 0]) == '89'


def test_train_split_shorter_than_a_row_names_the_source(tmp_path):
  (tmp_path / 'tiny.txt').write_text('abc', encoding='utf-8')
  config = make_config(source='text', path=str(tmp_path / 'tiny.txt'), tokenizer='bytes')
  with pytest.raises(ValueError, match='tiny.txt.*seq_len'):
    data.make_train_iterator(config, tokenizers.ByteTokenizer(), 0, 1)


def test_eval_tokenizes_only_the_documents_it_needs(monkeypatch):
  read = set()

  class Recording(list):
    def __getitem__(self, index):
      read.add(index)
      return super().__getitem__(index)

  documents = Recording(f'document {i}' for i in range(5000))
  monkeypatch.setattr(sources, 'load_documents', lambda data_config, split: documents)
  batches = data.make_eval_batches(make_config(tokenizer='bytes'), tokenizers.ByteTokenizer(), 0, 1)
  assert len(batches) == 2  # eval_batches x 4 x 8 tokens: a few dozen documents' worth.
  assert max(read) < 1024  # One tokenizer call's worth of documents, not the whole split.


# Streaming pipeline: documents tokenized and packed as they are read.


def write_documents(tmp_path, count=24):
  """A directory of `count` distinct short documents (one per file), all for training.

  Rows keep their packed order (shuffle_window=0) unless a test sets a window.
  """
  corpus = tmp_path / 'docs'
  corpus.mkdir()
  texts = [f'doc {i}: ' + 'xyz'[i % 3] * (3 + i % 11) for i in range(count)]
  for i, text in enumerate(texts):
    (corpus / f'{i:03d}.txt').write_text(text, encoding='utf-8')
  config = make_config(source='text', path=str(corpus), tokenizer='bytes', val_fraction=0.0,
                       streaming=True, read_threads=2, shuffle_window=0)
  return config, texts


def streamed_documents(config, process_index, process_count, num_batches):
  """The documents in the order this process's rows hold them (rows joined, split at eos)."""
  tokenizer = tokenizers.ByteTokenizer()
  batches = take(data.make_train_iterator(config, tokenizer, process_index, process_count),
                 num_batches)
  for batch in batches:
    assert batch['inputs'].dtype == np.int32 and batch['inputs'].shape[1] == config.seq_len
    np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  rows = [np.concatenate([b['inputs'], b['targets'][:, -1:]], axis=1) for b in batches]
  stream = np.concatenate(rows).reshape(-1)
  pieces = np.split(stream, np.flatnonzero(stream == tokenizer.eos_id) + 1)
  return [tokenizer.decode(piece[:-1]) for piece in pieces[:-1]]  # The last may be cut short.


def test_streaming_rows_hold_each_document_once_per_epoch(tmp_path):
  config, texts = write_documents(tmp_path)
  epoch_batches = 2 * sum(len(t) + 1 for t in texts) // (config.batch_size * (config.seq_len + 1))
  documents = streamed_documents(config, 0, 1, epoch_batches)
  first_epoch = documents[:len(texts)]
  assert sorted(first_epoch) == sorted(texts)
  assert first_epoch != texts  # Shuffled,
  assert documents[len(texts):len(texts) + 5] != first_epoch[:5]  # and reshuffled each epoch.
  config.seed = 1
  assert streamed_documents(config, 0, 1, 4)[:4] != first_epoch[:4]


def test_streaming_processes_read_disjoint_documents(tmp_path):
  config, texts = write_documents(tmp_path)
  per_process = [streamed_documents(config, p, 2, 12)[:len(texts) // 2] for p in range(2)]
  assert not set(per_process[0]) & set(per_process[1])
  assert sorted(per_process[0] + per_process[1]) == sorted(texts)


def test_streaming_window_shuffles_rows(tmp_path):
  config, _ = write_documents(tmp_path)
  tokenizer = tokenizers.ByteTokenizer()
  rows = lambda batches: [tuple(row) for b in batches for row in b['inputs']]
  packed = rows(take(data.make_train_iterator(config, tokenizer, 0, 1), 8))
  config.data.shuffle_window = 8  # Two batches of 4 rows.
  shuffled = rows(take(data.make_train_iterator(config, tokenizer, 0, 1), 8))
  assert shuffled != packed
  for start in range(0, len(packed), 8):
    assert sorted(shuffled[start:start + 8]) == sorted(packed[start:start + 8])


def test_streaming_resume_from_state_is_exact(tmp_path):
  config, _ = write_documents(tmp_path)
  config.data.shuffle_window = 16  # Restores re-read a window from the packer's saved state.
  tokenizer = tokenizers.ByteTokenizer()
  iterator = data.make_train_iterator(config, tokenizer, 1, 2)
  take(iterator, 7)
  state = json.loads(json.dumps(iterator.get_state()))  # Checkpoints store it as JSON.
  expected = take(iterator, 30)  # Crosses epoch boundaries.
  resumed = data.make_train_iterator(config, tokenizer, 1, 2)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 30), expected)


def test_streaming_reads_a_tfds_source():
  records = {'train': [{'text': f'record {i} '.encode() * (i + 1)} for i in range(10)],
             'test': [{'text': b'held out'}]}
  config = make_config(source='tfds', tfds_name='lm1b', tokenizer='bytes', streaming=True)
  with tfds.testing.mock_data(as_data_source_fn=fake_data_source(records)):
    batches = take(data.make_train_iterator(config, tokenizers.ByteTokenizer(), 0, 1), 5)
  text = tokenizers.ByteTokenizer().decode(np.concatenate([b['inputs'] for b in batches]).ravel())
  assert 'record' in text and 'held out' not in text


def test_unigram_entropy_of_uniform_and_constant_streams():
  assert pipeline.unigram_entropy(np.arange(8).repeat(3)) == pytest.approx(np.log(8))
  assert pipeline.unigram_entropy(np.full(10, 5)) == 0.0


def test_stdlib_include_and_exclude_select_package_families():
  everything = sources.stdlib_paths(0.1, 'train')
  without = sources.stdlib_paths(0.1, 'train', exclude=('email/*', 'xml/*'))
  only = sources.stdlib_paths(0.1, 'train', include=('email/*', 'xml/*'))
  root = sources.stdlib_root()
  family = lambda path: path.relative_to(root).parts[0]
  assert only and {family(p) for p in only} == {'email', 'xml'}
  assert not {family(p) for p in without} & {'email', 'xml'}
  assert set(without) | set(only) == set(everything) and not set(without) & set(only)
