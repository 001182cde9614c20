"""Task records (data.source='jsonl'): JSON lines -> checked records -> token ids and loss masks.

data.format (the field names are TRL's):
  text               {"text": str}: every token is a target, as data.source='text' trains.
  prompt_completion  {"prompt": str, "completion": str}: bos (if the tokenizer has one), the
                     prompt's ids, the completion's ids, eos; the loss is on the completion and
                     its eos. Prompt and completion are tokenized apart, so the prompt's ids are
                     the ones a model is prompted with later.
  chat               {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}:
                     chat.encode with the tokenizer's template; the loss is on assistant turns.
  classification     {"text": str, "label": one of data.labels}: bos (if any) and the text's ids,
                     no eos (the classify head reads the last one), and the label's index.
  preference         {"prompt": ..., "chosen": ..., "rejected": ...}: three strings, or three
                     message lists (the conversational form). Each of chosen and rejected is an
                     Example of the prompt and that completion, as prompt_completion encodes
                     them (the eos TRL appends included), or, conversational, as chat.encode
                     renders prompt + completion with the loss on the completion's assistant
                     turns only.

A bad record is a one-line ValueError `FILE:LINE: field 'NAME' ...`. Every record is read and
checked when a split is first loaded, so a bad line anywhere stops a run before its first step;
chat templates render when the records are tokenized, also before the first step.

A record is held out for evaluation when the hash of its line is below data.val_fraction: the split
is fixed by the record alone, and identical records land in the same split.
"""
from collections.abc import Sequence
import dataclasses
import json

import ml_collections
import numpy as np

from lepton_jax.data import chat
from lepton_jax.data import sources
from lepton_jax.data import tokenizers

FORMATS = ('text', 'prompt_completion', 'chat', 'classification', 'preference')
TOKENIZED_FORMATS = ('text', 'prompt_completion', 'chat')  # Those encode() turns into examples.


@dataclasses.dataclass(frozen=True)
class Record:
  where: str  # FILE:LINE
  line: str
  fields: dict  # The JSON object, checked against its format.


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized record; loss_mask marks the ids that are targets of the sft objective."""
  ids: np.ndarray  # int32 [n]
  loss_mask: np.ndarray  # bool [n]; the first id is never a target, whatever its mask.


def read_records(path: str) -> list[Record]:
  """The records of every file data.path matches (sorted), each parsed into a JSON object."""
  records = []
  for file in sources.matching_files(path):
    for number, line in enumerate(sources.read_utf8(file).splitlines(), start=1):
      if not line.strip():
        continue
      where = f'{file}:{number}'
      try:
        fields = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: malformed JSON ({e.msg} at column {e.colno})') from None
      if not isinstance(fields, dict):
        raise ValueError(f'{where}: a record must be a JSON object, got {_short(fields)}')
      records.append(Record(where, line, fields))
  if not records:
    raise ValueError(f'data.path={path!r} holds no records (one JSON object per line)')
  return records


def load_records(data_config: ml_collections.ConfigDict, split: str) -> list[Record]:
  """The checked records of `split`; every record of both splits is checked first."""
  records = read_records(data_config.path)
  for record in records:
    check(record, data_config.format, tuple(data_config.labels))
  chosen = [r for r in records
            if (sources.hash_fraction(r.line) < data_config.val_fraction) == (split == 'eval')]
  if not chosen:
    raise ValueError(f'data.path={data_config.path!r}: none of its {len(records)} records falls '
                     f'in the {split} split (data.val_fraction={data_config.val_fraction}); add '
                     'records or change data.val_fraction')
  return chosen


def check(record: Record, fmt: str, labels: Sequence = ()) -> None:
  """Raises `FILE:LINE: field ...` if the record does not have what `fmt` needs."""
  fields, fail = record.fields, lambda message: _fail(record, message)
  if fmt in ('text', 'classification'):
    _text(record, 'text')
  if fmt == 'prompt_completion':
    _text(record, 'prompt', allow_empty=True)
    _text(record, 'completion')
  if fmt == 'chat':
    messages = _messages(record, 'messages')
    if not any(m['role'] == 'assistant' for m in messages):
      fail("field 'messages' has no assistant turn: nothing to train on")
  if fmt == 'classification':
    label = fields.get('label', _MISSING)
    if label is _MISSING:
      fail("missing field 'label'")
    if isinstance(label, bool) or label not in labels:
      fail(f"field 'label'={_short(label)} is not in data.labels={tuple(labels)}")
  if fmt == 'preference':
    _preference(record)


def label_index(record: Record, labels: Sequence) -> int:
  """The class of a checked classification record: its label's index in data.labels."""
  return list(labels).index(record.fields['label'])


def encode(record: Record, fmt: str, tokenizer: tokenizers.Tokenizer) -> Example:
  """The ids and loss mask of a checked record of a TOKENIZED_FORMATS format."""
  fields, start = record.fields, tokenizers.document_start(tokenizer)
  if fmt == 'text':
    ids = start + tokenizer.encode(fields['text']) + [tokenizer.eos_id]
    mask = [1] * len(ids)
  elif fmt == 'prompt_completion':
    prompt = start + tokenizer.encode(fields['prompt'])
    completion = tokenizer.encode(fields['completion']) + [tokenizer.eos_id]
    ids, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
  elif fmt == 'chat':
    try:
      ids, mask = chat.encode(tokenizer, fields['messages'])
    except ValueError as e:
      raise ValueError(f'{record.where}: {e}') from None
  else:
    raise ValueError(f'data.format={fmt!r} records are not token sequences; '
                     f'one of {TOKENIZED_FORMATS} is')
  return Example(np.asarray(ids, np.int32), np.asarray(mask, bool))


def encode_classification(record: Record, tokenizer: tokenizers.Tokenizer,
                          labels: Sequence) -> tuple[np.ndarray, int]:
  """(ids int32 [n], label index) of a checked classification record."""
  ids = tokenizers.document_start(tokenizer) + tokenizer.encode(record.fields['text'])
  return np.asarray(ids, np.int32), label_index(record, labels)


def encode_preference(record: Record, tokenizer: tokenizers.Tokenizer) -> tuple[Example, Example]:
  """(chosen, rejected) of a checked preference record, each with the loss on its completion."""
  fields = record.fields
  if isinstance(fields['prompt'], str):
    pair = [Record(record.where, record.line, {'prompt': fields['prompt'],
                                               'completion': fields[side]})
            for side in ('chosen', 'rejected')]
    return tuple(encode(r, 'prompt_completion', tokenizer) for r in pair)
  try:
    prompt_ids, _ = chat.encode(tokenizer, fields['prompt'], add_generation_prompt=True)
    examples = []
    for side in ('chosen', 'rejected'):
      ids, mask = chat.encode(tokenizer, fields['prompt'] + fields[side])
      mask = np.asarray(mask, bool) & (np.arange(len(ids)) >= len(prompt_ids))
      examples.append(Example(np.asarray(ids, np.int32), mask))
  except ValueError as e:
    raise ValueError(f'{record.where}: {e}') from None
  return tuple(examples)


def record_text(record: Record, fmt: str) -> str:
  """The text a record holds, for training a tokenizer on the records."""
  fields = record.fields
  if fmt == 'chat':
    return '\n'.join(m['content'] for m in fields['messages'])
  if fmt == 'prompt_completion':
    return fields['prompt'] + fields['completion']
  if fmt == 'preference':
    parts = [fields[key] for key in ('prompt', 'chosen', 'rejected')]
    return '\n'.join(p if isinstance(p, str) else '\n'.join(m['content'] for m in p)
                     for p in parts)
  return fields['text']


_MISSING = object()


def _fail(record: Record, message: str):
  raise ValueError(f'{record.where}: {message}')


def _short(value) -> str:
  text = json.dumps(value, ensure_ascii=False) if value is not _MISSING else 'missing'
  return text if len(text) <= 60 else text[:57] + '...'


def _text(record: Record, name: str, allow_empty: bool = False) -> str:
  value = record.fields.get(name, _MISSING)
  if value is _MISSING:
    _fail(record, f'missing field {name!r}')
  if not isinstance(value, str):
    _fail(record, f'field {name!r} must be a string, got {_short(value)}')
  if not value and not allow_empty:
    _fail(record, f'field {name!r} is empty')
  return value


def _messages(record: Record, name: str) -> list[dict]:
  value = record.fields.get(name, _MISSING)
  if value is _MISSING:
    _fail(record, f'missing field {name!r}')
  try:
    chat.check_messages(value)
  except ValueError as e:
    _fail(record, f'field {name!r}: {e}')
  return value


def _preference(record: Record) -> None:
  """Strings, or (the conversational form) message lists, all three alike; chosen != rejected."""
  if 'prompt' not in record.fields:
    _fail(record, "missing field 'prompt'")
  conversational = isinstance(record.fields['prompt'], list)
  for name in ('prompt', 'chosen', 'rejected'):
    if conversational:
      messages = _messages(record, name)
      if name != 'prompt' and not any(m['role'] == 'assistant' for m in messages):
        _fail(record, f"field {name!r} has no assistant turn: no completion to score")
    else:
      _text(record, name, allow_empty=name == 'prompt')
  if record.fields['chosen'] == record.fields['rejected']:
    _fail(record, "field 'chosen' equals field 'rejected': the pair prefers nothing")
