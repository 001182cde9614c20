"""config.data.document_masking: language-model rows get one segment per document and positions
restarting after each eos, and then no token attends across a document boundary, in the XLA
path and the splash kernel (interpret mode)."""
import dataclasses

import jax
import numpy as np
import pytest

from lepton_jax import config_lib
from lepton_jax.data import packing, pipeline, tokenizers
from lepton_jax.model import ModelConfig, Transformer

from tests.conftest import TEXT, override, tiny_config

EOS = 7


def test_document_segments_start_after_every_eos():
  inputs_RT = np.asarray([[3, 4, EOS, 5, 6, 6, EOS, EOS, 1],
                          [EOS, 2, 2, 2, 2, 2, 2, 2, 2]])
  segment_ids_RT, positions_RT = packing.document_segments(inputs_RT, EOS)
  np.testing.assert_array_equal(segment_ids_RT, [[1, 1, 1, 2, 2, 2, 2, 3, 4],
                                                 [1, 2, 2, 2, 2, 2, 2, 2, 2]])
  np.testing.assert_array_equal(positions_RT, [[0, 1, 2, 0, 1, 2, 3, 0, 0],
                                               [0, 0, 1, 2, 3, 4, 5, 6, 7]])
  assert segment_ids_RT.dtype == positions_RT.dtype == np.int32


def test_train_batches_carry_segments_only_with_document_masking(tmp_path):
  tokenizer = tokenizers.ByteTokenizer()
  for i in range(40):  # Documents shorter than a row, so that rows hold boundaries.
    (tmp_path / f'doc{i:02d}.txt').write_text(TEXT[i * 50:i * 50 + 30 + i])
  batches = {}
  for masking in (False, True):
    config = override(tiny_config(), **{'data.document_masking': masking,
                                        'data.path': str(tmp_path)})
    batches[masking] = next(pipeline.make_train_iterator(config, tokenizer, 0, 1))
  assert 'segment_ids' not in batches[False]
  batch = batches[True]
  np.testing.assert_array_equal(batch['inputs'], batches[False]['inputs'])
  expected = packing.document_segments(batch['inputs'], tokenizer.eos_id)
  np.testing.assert_array_equal(batch['segment_ids'], expected[0])
  np.testing.assert_array_equal(batch['positions'], expected[1])
  assert (batch['inputs'] == tokenizer.eos_id).any()  # The rows do hold document boundaries.


def tiny_model(attention_impl: str) -> Transformer:
  cfg = ModelConfig.from_config(config_lib.model_config())
  return Transformer(dataclasses.replace(
      cfg, vocab_size=32, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
      d_ff=64, max_seq_len=128, attention=attention_impl))


@pytest.mark.parametrize('attention_impl', ['xla', 'splash'])
def test_no_token_attends_across_a_document_boundary(attention_impl):
  """A row of two documents: each document's logits are those of the document alone, whatever
  the other holds."""
  rng = np.random.default_rng(0)
  first, second = 50, 78
  row_T = rng.integers(0, EOS, first + second)
  row_T[first - 1] = EOS
  other_T = row_T.copy()
  other_T[:first - 1] = rng.integers(0, EOS, first - 1)  # Another first document, same length.
  rows_BT = np.stack([row_T, other_T])
  segment_ids_BT, positions_BT = packing.document_segments(rows_BT, EOS)
  model = tiny_model(attention_impl)
  params = tiny_model('xla').init(jax.random.key(0), rows_BT)
  logits_BTV = jax.jit(model.apply)(params, rows_BT, positions_BT, segment_ids_BT=segment_ids_BT)
  alone_BTV = tiny_model('xla').apply(params, rows_BT[:, first:])  # Positions from 0.
  tolerance = dict(atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits_BTV[:, first:], alone_BTV, **tolerance)
  np.testing.assert_allclose(logits_BTV[0, first:], logits_BTV[1, first:], **tolerance)
  assert not np.allclose(logits_BTV[0, :first - 1], logits_BTV[1, :first - 1], atol=1e-3)


def test_document_masking_is_for_text_and_not_cudnn():
  config = override(tiny_config(), **{'data.document_masking': True, 'model.attention': 'cudnn'})
  with pytest.raises(ValueError, match=r"document_masking=True needs segment ids .*'cudnn'"):
    config_lib.validate(config)
  config = override(tiny_config(), **{'data.document_masking': True, 'data.source': 'jsonl'})
  with pytest.raises(ValueError, match=r'document_masking=True is for language-model text'):
    config_lib.validate(config)
