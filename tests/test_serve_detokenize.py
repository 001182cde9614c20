"""Incremental detokenization: token-by-token increments join to the whole decode for bytes
(multi-byte characters split over tokens), SentencePiece (spaces written by the next piece) and
byte-level BPE; stop strings are cut and never shown in part."""
import io

import pytest
import sentencepiece as spm

from lepton_jax.data import tokenizers
from lepton_jax.serve import detokenize
from tests.conftest import TEXT

SAMPLE = 'héllo wörld — the quick  brown fox\n\tjumps 42 times ✓ 日本語'


@pytest.fixture(scope='module')
def sentencepiece_tokenizer(tmp_path_factory):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.splitlines() + [SAMPLE]),
                                 model_writer=model, vocab_size=360, minloglevel=2,
                                 **tokenizers.SPM_TRAINER_OPTIONS)
  path = tmp_path_factory.mktemp('spm') / 'spm.model'
  path.write_bytes(model.getvalue())
  return tokenizers.SentencePieceTokenizer(str(path))


@pytest.fixture(scope='module')
def bpe_tokenizer(tmp_path_factory):
  pytest.importorskip('tokenizers')
  from tests.conftest import save_tiny_hf_llama  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp('bpe')
  pytest.importorskip('transformers')
  save_tiny_hf_llama(directory)
  return tokenizers.HFTokenizer(str(directory))


def tokenizer_of(name, request):
  return tokenizers.ByteTokenizer() if name == 'bytes' else request.getfixturevalue(name)


@pytest.mark.parametrize('name', ['bytes', 'sentencepiece_tokenizer', 'bpe_tokenizer'])
def test_increments_join_to_the_whole_decode(name, request):
  tokenizer = tokenizer_of(name, request)
  prompt = tokenizer.encode('line 1: ')
  new = tokenizer.encode(SAMPLE)
  stream = detokenize.Detokenizer(tokenizer, prompt)
  pieces = [stream.add(token) for token in new] + [stream.flush()]
  whole = tokenizer.decode(prompt + new)
  assert ''.join(pieces) == whole[len(tokenizer.decode(prompt)):]
  assert detokenize.REPLACEMENT not in ''.join(pieces)


@pytest.mark.parametrize('name', ['bytes', 'sentencepiece_tokenizer'])
def test_stop_strings_are_cut_and_never_shown_in_part(name, request):
  tokenizer = tokenizer_of(name, request)
  text = 'the quick brown fox jumps over the lazy dog'
  for stop in (['brown fox', 'zzz'], ['o'], ['lazy dog'], ['not there']):
    stream = detokenize.TextStream(tokenizer, [], stop)
    shown = ''
    for token in tokenizer.encode(text):
      shown += stream.add(token)
      assert not any(s[:-1] and shown.endswith(s[:-1]) for s in stop if s in text), shown
    shown += stream.finish()
    ends = [text.find(s) for s in stop if s in text]
    assert shown == (text[:min(ends)] if ends else text)
    assert stream.stopped == bool(ends)
