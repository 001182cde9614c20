"""Task records (data/formats.py), packing (data/packing.py) and the jsonl pipeline (offline)."""
import json

import numpy as np
import pytest

from lepton_jax import config_lib
from lepton_jax import data
from lepton_jax.data import formats
from lepton_jax.data import packing
from lepton_jax.data import tokenizers

BYTES = tokenizers.ByteTokenizer()
EOS = BYTES.eos_id


def write_jsonl(path, lines):
  """Writes records (dicts) or raw strings, one per line."""
  path.write_text(''.join((line if isinstance(line, str) else json.dumps(line)) + '\n'
                          for line in lines), encoding='utf-8')
  return str(path)


def task_config(path, fmt='prompt_completion', **overrides):
  config = config_lib.base_config()
  config.seq_len, config.batch_size, config.eval_batches = 16, 4, 2
  config.objective = 'sft'
  config.data.update(source='jsonl', path=str(path), format=fmt, tokenizer='bytes',
                     val_fraction=0.2)
  for key, value in overrides.items():
    target, *keys = key.split('.')
    if keys:
      config[target][keys[0]] = value
    else:
      config[key] = value
  return config


def prompt_completions(count=40):
  return [{'prompt': f'{i}+{i % 5}=', 'completion': str(i + i % 5) * (1 + i % 4)}
          for i in range(count)]


# Records and their errors.

CHAT = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]
BAD_RECORDS = [
    ('text', '{"text": "a"', r'malformed JSON \(Expecting .* at column \d+\)'),
    ('text', '["a list"]', r'a record must be a JSON object, got \["a list"\]'),
    ('text', {'txt': 'a'}, r"missing field 'text'"),
    ('text', {'text': ''}, r"field 'text' is empty"),
    ('text', {'text': 3}, r"field 'text' must be a string, got 3"),
    ('prompt_completion', {'prompt': 'q'}, r"missing field 'completion'"),
    ('prompt_completion', {'prompt': 'q', 'completion': ''}, r"field 'completion' is empty"),
    ('chat', {'message': CHAT}, r"missing field 'messages'"),
    ('chat', {'messages': CHAT[:1]}, r"field 'messages' has no assistant turn"),
    ('chat', {'messages': [{'role': 'bot', 'content': 'x'}]},
     r"field 'messages': messages\[0\].role='bot' is not one of"),
    ('classification', {'text': 'x'}, r"missing field 'label'"),
    ('classification', {'text': 'x', 'label': 'maybe'},
     r"field 'label'=\"maybe\" is not in data.labels=\('no', 'yes'\)"),
    ('classification', {'text': 'x', 'label': True}, r"field 'label'=true is not in data.labels"),
    ('preference', {'chosen': 'a', 'rejected': 'b'}, r"missing field 'prompt'"),
    ('preference', {'prompt': 'q', 'chosen': 'a', 'rejected': 'a'},
     r"field 'chosen' equals field 'rejected'"),
    ('preference', {'prompt': CHAT[:1], 'chosen': CHAT[1:], 'rejected': CHAT[1:]},
     r"field 'chosen' equals field 'rejected'"),
    ('preference', {'prompt': CHAT[:1], 'chosen': 'a', 'rejected': CHAT[1:]},
     r"field 'chosen': messages must be a non-empty list"),
    ('preference', {'prompt': CHAT[:1], 'chosen': CHAT[:1], 'rejected': CHAT[1:]},
     r"field 'chosen' has no assistant turn: no completion to score"),
]


@pytest.mark.parametrize('fmt,bad,error', BAD_RECORDS)
def test_every_bad_record_is_a_one_line_error_naming_file_line_and_field(tmp_path, fmt, bad,
                                                                          error):
  good = {'text': {'text': 'fine'}, 'prompt_completion': {'prompt': 'q', 'completion': 'a'},
          'chat': {'messages': CHAT}, 'classification': {'text': 'fine', 'label': 'yes'},
          'preference': {'prompt': 'q', 'chosen': 'a', 'rejected': 'b'}}[fmt]
  path = write_jsonl(tmp_path / 'records.jsonl', [good, '', good, bad, good])
  config = task_config(path, fmt, **{'data.labels': ('no', 'yes')})
  with pytest.raises(ValueError, match=f'^{path}:4: {error}') as raised:
    formats.load_records(config.data, 'train')
  assert '\n' not in str(raised.value)


def test_a_chat_template_that_fails_to_render_names_the_line(tmp_path):
  pytest.importorskip('transformers')
  from tests.conftest import save_tiny_chat_tokenizer  # pylint: disable=g-import-not-at-top
  save_tiny_chat_tokenizer(tmp_path / 'tok', "{% if messages|length > 2 %}"
                           "{{ raise_exception('one exchange only') }}{% endif %}x")
  path = write_jsonl(tmp_path / 'chats.jsonl', [{'messages': CHAT}, {'messages': CHAT * 2}])
  records = formats.read_records(path)
  tokenizer = tokenizers.HFTokenizer(str(tmp_path / 'tok'))
  assert formats.encode(records[0], 'chat', tokenizer).ids.size
  with pytest.raises(ValueError, match=f'^{path}:2: the chat template fails to render this chat: '
                     'TemplateError: one exchange only$'):
    formats.encode(records[1], 'chat', tokenizer)


def test_classification_and_preference_records_parse(tmp_path):
  path = write_jsonl(tmp_path / 'labels.jsonl', [{'text': 'a', 'label': 2},
                                                 {'text': 'b', 'label': 0}])
  records = formats.read_records(path)
  for record in records:
    formats.check(record, 'classification', (0, 1, 2))
  assert [formats.label_index(r, (0, 1, 2)) for r in records] == [2, 0]
  with pytest.raises(ValueError, match=r"labels.jsonl:1: field 'label'=2 is not in .*\('0', '2'\)"):
    formats.check(records[0], 'classification', ('0', '2'))  # Names are not ids.
  path = write_jsonl(tmp_path / 'pairs.jsonl', [
      {'prompt': 'q', 'chosen': 'good', 'rejected': 'bad'},
      {'prompt': CHAT[:1], 'chosen': [{'role': 'assistant', 'content': 'good'}],
       'rejected': [{'role': 'assistant', 'content': 'bad'}]}])
  for record in formats.read_records(path):
    formats.check(record, 'preference')


def test_splits_are_disjoint_fixed_by_the_record_and_checked_whole(tmp_path):
  records = prompt_completions(200)
  path = write_jsonl(tmp_path / 'a.jsonl', records + records[:10])  # Ten duplicates.
  config = task_config(path)
  train = formats.load_records(config.data, 'train')
  evals = formats.load_records(config.data, 'eval')
  assert len(train) + len(evals) == 210
  assert not {r.line for r in train} & {r.line for r in evals}
  assert 0.1 < len(evals) / 210 < 0.3
  reordered = write_jsonl(tmp_path / 'b.jsonl', records[::-1])
  assert ({r.line for r in formats.load_records(task_config(reordered).data, 'eval')} ==
          {r.line for r in evals})
  write_jsonl(tmp_path / 'a.jsonl', records + ['{broken'])  # A bad eval-split line stops train.
  with pytest.raises(ValueError, match=r'a.jsonl:201: malformed JSON'):
    formats.load_records(config.data, 'train')


def test_prompt_completion_and_text_encode_with_their_loss_masks(tmp_path):
  path = write_jsonl(tmp_path / 'r.jsonl', [{'prompt': 'Q: ', 'completion': 'yes', 'text': 'ab'}])
  (record,) = formats.read_records(path)
  example = formats.encode(record, 'prompt_completion', BYTES)
  np.testing.assert_array_equal(example.ids, list(b'Q: yes') + [EOS])
  np.testing.assert_array_equal(example.loss_mask, [0, 0, 0, 1, 1, 1, 1])
  example = formats.encode(record, 'text', BYTES)
  np.testing.assert_array_equal(example.ids, [97, 98, EOS])
  assert example.loss_mask.all()


# Packing.


def example(ids, mask=None):
  ids = np.asarray(ids, np.int32)
  return formats.Example(ids, np.ones(len(ids), bool) if mask is None else np.asarray(mask, bool))


def test_packing_keeps_examples_whole_with_segments_and_restarting_positions():
  rng = np.random.default_rng(0)
  examples = [example(rng.integers(0, 256, n), rng.integers(0, 2, n)) for n in
              (3, 9, 20, 5, 2, 12, 7, 17, 4)]
  rows = packing.pack(examples, seq_len=16, packing=True, side='right', pad_id=EOS)
  assert rows.truncated == 1 and rows.inputs.shape[1] == 16
  assert len(rows) < len(examples)
  found = []
  for r in range(len(rows)):
    segments = rows.segment_ids[r]
    assert np.all(np.diff(segments[segments > 0]) >= 0)  # Contiguous, numbered in order.
    assert np.all(segments[np.argmax(segments == 0):] == 0) or segments.all()  # Padding at the end.
    for s in range(1, segments.max() + 1):
      span = segments == s
      np.testing.assert_array_equal(rows.positions[r][span], np.arange(span.sum()))
      ids = np.concatenate([rows.inputs[r][span], rows.targets[r][span][-1:]])
      np.testing.assert_array_equal(rows.inputs[r][span][1:], rows.targets[r][span][:-1])
      found.append((tuple(ids), tuple(rows.loss_mask[r][span])))
    assert not rows.loss_mask[r][segments == 0].any()
  cut = [packing.truncate(e, 16, 'right') for e in examples]
  assert sorted(found) == sorted((tuple(e.ids), tuple(e.loss_mask[1:])) for e in cut)


def test_truncation_keeps_the_side_asked_for_and_unpacked_rows_hold_one_example():
  examples = [example(np.arange(30), [0] * 20 + [1] * 10), example([5, 6, 7])]
  for side, kept in (('right', np.arange(17)), ('left', np.arange(13, 30))):
    rows = packing.pack(examples, seq_len=16, packing=False, side=side, pad_id=EOS)
    assert len(rows) == 2 and rows.truncated == 1
    assert rows.emptied == (side == 'right')  # Cutting the right end lost every loss token.
    np.testing.assert_array_equal(rows.inputs[0], kept[:-1])
    np.testing.assert_array_equal(rows.targets[0], kept[1:])
    np.testing.assert_array_equal(rows.segment_ids[1], [1, 1] + [0] * 14)
    np.testing.assert_array_equal(rows.inputs[1][:3], [5, 6, EOS])


# The jsonl pipeline.


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_jsonl_batches_are_deterministic_resumable_and_shared_among_processes(tmp_path):
  config = task_config(write_jsonl(tmp_path / 'r.jsonl', prompt_completions()))
  iterator = data.make_train_iterator(config, BYTES, 0, 1)
  first = take(iterator, 6)
  assert set(first[0]) == {'inputs', 'targets', 'mask', 'positions', 'segment_ids'}
  state = json.loads(json.dumps(iterator.get_state()))
  expected = take(iterator, 20)  # Crosses epochs.
  resumed = data.make_train_iterator(config, BYTES, 0, 1)
  resumed.set_state(state)
  for a, b in zip(take(resumed, 20), expected):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  halves = [take(data.make_train_iterator(config, BYTES, p, 2), 6) for p in range(2)]
  for step, batch in enumerate(first):
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([halves[0][step][key], halves[1][step][key]]),
                                    batch[key])


def test_the_objective_picks_the_targets_and_unpacked_batches_have_no_segments(tmp_path):
  config = task_config(write_jsonl(tmp_path / 'r.jsonl', prompt_completions()))
  (sft,) = take(data.make_train_iterator(config, BYTES, 0, 1), 1)
  config.objective = 'lm'
  (lm,) = take(data.make_train_iterator(config, BYTES, 0, 1), 1)
  np.testing.assert_array_equal(lm['mask'], sft['segment_ids'] > 0)
  assert 0 < sft['mask'].sum() < lm['mask'].sum()
  # The sft targets are the completions and their eos.
  for row in range(len(sft['inputs'])):
    completion = BYTES.decode(sft['targets'][row][sft['mask'][row] > 0])
    assert completion and set(completion) <= set('0123456789')
  config.data.packing = False
  (unpacked,) = take(data.make_train_iterator(config, BYTES, 0, 1), 1)
  assert 'segment_ids' not in unpacked


def test_jsonl_eval_batches_are_the_packed_rows_in_order_then_empty_rows(tmp_path):
  config = task_config(write_jsonl(tmp_path / 'r.jsonl', prompt_completions()), eval_batches=5)
  examples = [formats.encode(r, 'prompt_completion', BYTES)
              for r in formats.load_records(config.data, 'eval')]
  rows = packing.pack(examples, config.seq_len, True, 'right', EOS)
  batches = data.make_eval_batches(config, BYTES, 0, 1)
  assert len(batches) == min(5, -(-len(rows) // config.batch_size))
  mask = np.concatenate([b['mask'] for b in batches])
  segment_ids = np.concatenate([b['segment_ids'] for b in batches])
  np.testing.assert_array_equal(mask[:len(rows)], rows.loss_mask)
  np.testing.assert_array_equal(segment_ids[:len(rows)], rows.segment_ids)
  assert len(mask) > len(rows) and not mask[len(rows):].any()
  assert not segment_ids[len(rows):].any()


@pytest.mark.parametrize('overrides,error', [
    ({'data.source': 'text'}, r"objective='sft' trains on the loss tokens of task records"),
    ({'data.format': 'classification'}, r"data.format='classification' is not what "
     r"config.objective='sft' trains on; use one of \('text', 'prompt_completion', 'chat'\)"),
    ({'data.streaming': True}, r'streaming=True: jsonl task records are read .* up front'),
    ({'model.attention': 'cudnn'}, r"packing=True needs segment ids .*='cudnn' cannot"),
    ({'data.truncate': 'middle'}, r"config.data.truncate='middle': expected one of"),
    ({'objective': 'dpo'}, r"data.format='prompt_completion' is not what config.objective='dpo' "
     r"trains on; use one of \('preference',\)"),
    ({'objective': 'rlhf'}, r"config.objective='rlhf': expected one of \('lm', 'sft', 'distill', "
     r"'classify', 'dpo'\)"),
    ({'objective': 'classify', 'data.format': 'classification', 'data.labels': ('a',)},
     r"config.model.head='lm' with config.objective='classify': the classify objective trains"),
    ({'objective': 'classify', 'model.head': 'classify', 'data.format': 'classification'},
     r"config.data.labels is empty: data.format='classification' needs the label list"),
    ({'objective': 'dpo', 'data.format': 'preference', 'dpo.beta': 0.0},
     r'config.dpo.beta=0.0 must be positive'),
    ({'objective': 'dpo', 'data.format': 'preference', 'dpo.loss': 'kto'},
     r"config.dpo.loss='kto': expected one of \('sigmoid', 'ipo', 'robust'\)"),
])
def test_task_data_config_errors_name_the_key(tmp_path, overrides, error):
  with pytest.raises(ValueError, match=error):
    config_lib.validate(task_config(tmp_path / 'r.jsonl', **overrides))
