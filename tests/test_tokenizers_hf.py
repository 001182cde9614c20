"""Tests of data.tokenizer='hf' against transformers, with tokenizers built here (CPU, offline)."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from lepton_jax import data
from lepton_jax.data import sources
from lepton_jax.data import tokenizers
from tests.conftest import tiny_config

hf_tokenizers = pytest.importorskip('tokenizers')
transformers = pytest.importorskip('transformers')

TRAIN_FILES = ('textwrap.py', 'shlex.py', 'string.py', 'functools.py', 'tabnanny.py')
HELD_OUT_FILES = ('inspect.py', 'argparse.py', 'typing.py')  # ~340 KB the BPE never saw.
UNICODE_TEXT = 'naïve café ☃ 日本語 𝔘𝔫𝔦 \t tabs\r\n\n\n  trailing  \x00 end'
BOS, EOS, PAD, END = '<s>', '</s>', '<pad>', '<|end|>'


def stdlib_text(name: str) -> str:
  return (sources.stdlib_root() / name).read_text(encoding='utf-8')


def trained_bpe():
  """A byte-level BPE trained on stdlib code: specials <s> </s> <pad> are ids 0-2 and <|end|>, a
  second eos, is added past the trained vocabulary (id 1000)."""
  tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(
      vocab_size=1000, special_tokens=[BOS, EOS, PAD], show_progress=False,
      initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator([stdlib_text(name) for name in TRAIN_FILES], trainer)
  tokenizer.add_special_tokens([END])
  return tokenizer


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A directory as a Hugging Face model ships it: tokenizer.json, tokenizer_config.json, and a
  config.json naming bos 0 and eos [1, 1000]."""
  directory = tmp_path_factory.mktemp('hf')
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=trained_bpe(), bos_token=BOS, eos_token=EOS,
      pad_token=PAD).save_pretrained(directory)
  (directory / 'config.json').write_text(json.dumps({'bos_token_id': 0, 'eos_token_id': [1, 1000]}))
  return directory


@pytest.fixture(scope='module')
def hf_tokenizer(hf_dir):
  return data.build_tokenizer(tiny_config(**{'data.tokenizer': 'hf',
                                             'data.tokenizer_path': str(hf_dir)}).data, '')


@pytest.fixture(scope='module')
def auto_tokenizer(hf_dir):
  return transformers.AutoTokenizer.from_pretrained(hf_dir)


def copy_with(hf_dir, tmp_path, **files):
  """hf_dir's tokenizer.json in a new directory, with `files` (name without .json: dict) as json."""
  shutil.copy(hf_dir / 'tokenizer.json', tmp_path / 'tokenizer.json')
  for name, contents in files.items():
    (tmp_path / f'{name}.json').write_text(json.dumps(contents))
  return str(tmp_path)


def assert_one_line_error(error, *names):
  message = str(error.value)
  assert '\n' not in message
  for name in names:
    assert name in message


# Parity with transformers.


def test_encode_and_decode_match_transformers_on_stdlib_code(hf_tokenizer, auto_tokenizer):
  texts = [stdlib_text(name) for name in HELD_OUT_FILES] + [UNICODE_TEXT]
  assert sum(map(len, texts)) > 300_000
  for text in texts:
    ids = hf_tokenizer.encode(text)
    assert ids == auto_tokenizer(text, add_special_tokens=False)['input_ids']
    assert hf_tokenizer.decode(ids) == auto_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_special_tokens_in_text_match_transformers(hf_tokenizer, auto_tokenizer):
  text = f'{BOS}def f():{EOS}  return 1{END}\n'
  ids = hf_tokenizer.encode(text)
  assert ids == auto_tokenizer(text, add_special_tokens=False)['input_ids']
  assert {0, 1, 1000} <= set(ids)
  assert hf_tokenizer.decode(ids) == auto_tokenizer.decode(ids, skip_special_tokens=True)
  assert hf_tokenizer.decode(ids) == 'def f():  return 1\n'


def test_encode_batch_is_encode_of_each_text(hf_tokenizer):
  texts = [stdlib_text(name)[:5000] for name in HELD_OUT_FILES] + ['', UNICODE_TEXT]
  assert hf_tokenizer.encode_batch(texts) == [hf_tokenizer.encode(text) for text in texts]


def test_decode_accepts_numpy_ids(hf_tokenizer):
  ids = hf_tokenizer.encode('import os\n')
  assert hf_tokenizer.decode(np.asarray(ids + [1], np.int32)) == 'import os\n'


def test_vocab_size_counts_added_tokens(hf_tokenizer, auto_tokenizer):
  assert hf_tokenizer.vocab_size == len(auto_tokenizer) == 1001


def test_bos_and_eos_ids_come_from_config_json(hf_tokenizer, auto_tokenizer):
  assert hf_tokenizer.bos_id == auto_tokenizer.bos_token_id == 0
  assert hf_tokenizer.eos_id == auto_tokenizer.eos_token_id == 1
  assert hf_tokenizer.eos_ids == (1, 1000)


# Where bos and eos come from.


def test_tokenizer_config_tokens_may_be_added_token_dicts(hf_dir, tmp_path):
  path = copy_with(hf_dir, tmp_path, tokenizer_config={
      'bos_token': BOS, 'eos_token': {'content': END, 'special': True}})
  tokenizer = tokenizers.HFTokenizer(path)
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.eos_ids) == (0, 1000, (1000,))


def test_generation_config_wins_then_config_then_tokenizer_config(hf_dir, tmp_path):
  path = copy_with(hf_dir, tmp_path, generation_config={'eos_token_id': [1000, 2]},
                   config={'bos_token_id': 2, 'eos_token_id': 2},
                   tokenizer_config={'bos_token': BOS, 'eos_token': EOS})
  tokenizer = tokenizers.HFTokenizer(path)
  assert (tokenizer.eos_id, tokenizer.eos_ids) == (1000, (1000, 2, 1))
  assert tokenizer.bos_id is None  # config.json's bos wins, and it is an eos.


def test_a_bos_that_is_also_an_eos_is_not_a_bos(hf_dir, tmp_path):
  # As GPT-2 and Qwen ship: <|endoftext|> is both, and documents are separated by it alone.
  path = copy_with(hf_dir, tmp_path, config={'bos_token_id': 1, 'eos_token_id': 1})
  tokenizer = tokenizers.HFTokenizer(path)
  assert (tokenizer.bos_id, tokenizer.eos_ids) == (None, (1,))


def test_null_ids_are_absent(hf_dir, tmp_path):
  path = copy_with(hf_dir, tmp_path, config={'bos_token_id': None, 'eos_token_id': 1},
                   tokenizer_config={'bos_token': None})
  assert tokenizers.HFTokenizer(path).bos_id is None


# Errors.


def test_tokenizer_path_that_is_not_a_directory_names_it(hf_dir):
  for path in (str(hf_dir / 'tokenizer.json'), str(hf_dir / 'missing'), ''):
    with pytest.raises(NotADirectoryError) as error:
      data.build_tokenizer(tiny_config(**{'data.tokenizer': 'hf',
                                          'data.tokenizer_path': path}).data, '')
    assert_one_line_error(error, f'data.tokenizer_path={path!r}')


def test_directory_without_a_tokenizer_file_names_it(tmp_path):
  (tmp_path / 'config.json').write_text('{"eos_token_id": 1}')
  with pytest.raises(FileNotFoundError) as error:
    tokenizers.HFTokenizer(str(tmp_path))
  assert_one_line_error(error, str(tmp_path), 'tokenizer.json', 'tokenizer.model')


def test_directory_without_an_eos_names_it(hf_dir, tmp_path):
  path = copy_with(hf_dir, tmp_path, config={'bos_token_id': 0})
  with pytest.raises(ValueError) as error:
    tokenizers.HFTokenizer(path)
  assert_one_line_error(error, path, 'eos')


def test_eos_token_outside_the_vocabulary_names_the_file(hf_dir, tmp_path):
  path = copy_with(hf_dir, tmp_path, tokenizer_config={'eos_token': '<|eot|>'})
  with pytest.raises(ValueError) as error:
    tokenizers.HFTokenizer(path)
  assert_one_line_error(error, str(tmp_path / 'tokenizer_config.json'), "'<|eot|>'")


# A SentencePiece tokenizer.model.


def test_sentencepiece_model_only_directory_loads(tmp_path):
  text = stdlib_text('textwrap.py')
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text.split('\n')), model_prefix=str(tmp_path / 'tokenizer'),
      vocab_size=300, model_type='bpe', minloglevel=2)  # Default pieces: unk 0, bos 1, eos 2.
  processor = spm.SentencePieceProcessor(model_file=str(tmp_path / 'tokenizer.model'))
  (tmp_path / 'tokenizer.vocab').unlink()
  tokenizer = data.build_tokenizer(tiny_config(**{'data.tokenizer': 'hf',
                                                  'data.tokenizer_path': str(tmp_path)}).data, '')
  assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_ids) == (300, 1, (2,))
  sample = stdlib_text('shlex.py')[:3000]
  ids = tokenizer.encode(sample)
  assert ids == processor.encode(sample)
  assert tokenizer.encode_batch([sample, 'x = 1']) == [ids, processor.encode('x = 1')]
  assert tokenizer.decode([1] + ids + [2]) == processor.decode(ids)


# The packed stream.


@pytest.fixture
def hf_config(hf_dir, tmp_path):
  """tiny_config over 40 short stdlib documents, tokenized by hf_dir."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  code = stdlib_text('inspect.py')
  for i in range(40):
    (corpus / f'doc{i:02}.py').write_text(code[i * 150:i * 150 + 100 + 5 * i], encoding='utf-8')
  return tiny_config(**{'data.source': 'text', 'data.path': str(corpus), 'data.val_fraction': 0.0,
                        'data.tokenizer': 'hf', 'data.tokenizer_path': str(hf_dir)})


def test_tokenize_documents_puts_each_document_between_bos_and_eos(hf_config, hf_tokenizer):
  documents = data.load_documents(hf_config.data, 'train')
  stream = data.tokenize_documents(documents, hf_tokenizer)
  expected = [[0] + hf_tokenizer.encode(text) + [1] for text in documents]
  np.testing.assert_array_equal(stream, np.concatenate(expected))


@pytest.mark.parametrize('streaming', [False, True])
def test_train_batches_start_every_document_with_bos(hf_config, streaming):
  hf_config.data.update(streaming=streaming, read_threads=2, shuffle_window=0)
  tokenizer = data.build_tokenizer(hf_config.data, '')
  iterator = data.make_train_iterator(hf_config, tokenizer, 0, 1)
  batches = [next(iterator) for _ in range(10)]
  inputs = np.concatenate([batch['inputs'] for batch in batches])
  targets = np.concatenate([batch['targets'] for batch in batches])
  after_eos = targets[inputs == tokenizer.eos_id]
  assert len(after_eos) > 20
  np.testing.assert_array_equal(after_eos, tokenizer.bos_id)
  # And bos is nowhere else.
  np.testing.assert_array_equal(inputs[targets == tokenizer.bos_id], tokenizer.eos_id)


def test_core_data_import_does_not_import_tokenizers_or_transformers():
  loaded = subprocess.run(
      [sys.executable, '-c', 'import sys, lepton_jax.data, lepton_jax.config_lib; '
       "print([m for m in ('tokenizers', 'transformers') if m in sys.modules])"],
      capture_output=True, text=True, check=True).stdout
  assert loaded.strip() == '[]'
