"""scripts/reasoning_tasks.py and reasoning_accuracy.py: held-out questions are never training
ones, the files are records the pipeline reads, the scored prompts are the ids training saw
before each answer, and accuracy counts what score_answer rates correct; with reasoning-gym
(the `tasks` extra) installed, its own items and scorers."""
import json
import pathlib
import random
import sys

import numpy as np
import pytest

from lepton_jax import config_lib
from lepton_jax.data import chat, formats, tokenizers

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / 'scripts'))
import reasoning_accuracy  # pylint: disable=g-import-not-at-top,wrong-import-position
import reasoning_tasks  # pylint: disable=g-import-not-at-top,wrong-import-position


def sums(name, size, seed, **difficulty):
  """Items as reasoning-gym makes them: item i from Random(seed + i), a small question space."""
  del name
  top = 10 ** difficulty.get('max_digits', difficulty.get('max_value', 9))
  items = []
  for i in range(size):
    a, b = random.Random(seed + i).randrange(top), random.Random(seed + i + 1).randrange(top)
    items.append({'question': f'{a} + {b} =', 'answer': str(a + b), 'metadata': {}})
  return items


def test_held_out_splits_have_no_training_question_and_the_files_are_task_records(tmp_path,
                                                                                   monkeypatch):
  monkeypatch.setattr(reasoning_tasks, 'TASKS', {'sum': ({'max_digits': 1}, {'max_digits': 2})})
  splits = reasoning_tasks.make_splits(sums, train_size=60, test_size=5)
  assert [len(splits[s]) for s in ('train', 'test_id', 'test_ood')] == [60, 5, 5]
  seen = {r['item']['question'] for r in splits['train']}
  assert not seen & {r['item']['question'] for r in splits['test_id'] + splits['test_ood']}
  with pytest.raises(ValueError, match='sum: only .* held-out questions are not training ones'):
    reasoning_tasks.make_splits(sums, train_size=300, test_size=90)  # 100 questions in all.
  reasoning_tasks.write(str(tmp_path), splits)
  tokenizer = tokenizers.ByteTokenizer()
  for name, fmt in (('train.jsonl', 'prompt_completion'), ('train_chat.jsonl', 'chat'),
                    ('test_ood.jsonl', 'prompt_completion')):
    data = config_lib.base_config().data
    data.update(source='jsonl', format=fmt, path=str(tmp_path / name), val_fraction=0.0)
    records = formats.load_records(data, 'train')
    example = formats.encode(records[0], fmt, tokenizer)
    answer = tokenizer.decode(example.ids[example.loss_mask][:-1].tolist())  # Less its eos.
    assert answer.strip() == json.loads(
        (tmp_path / name).read_text().splitlines()[0]).get('completion', answer).strip()
  assert len(formats.load_records(data, 'train')) == 5
  # The order is fixed: the same files again.
  again = tmp_path / 'again'
  reasoning_tasks.write(str(again), reasoning_tasks.make_splits(sums, 60, 5))
  assert (again / 'train.jsonl').read_text() == (tmp_path / 'train.jsonl').read_text()


@pytest.mark.parametrize('fmt', ['prompt_completion', 'chat'])
def test_a_question_is_prompted_with_the_ids_training_saw_before_its_answer(fmt):
  tokenizer = tokenizers.ByteTokenizer()
  item = {'question': 'Calculate 2 * 3.', 'answer': '6'}
  record = formats.Record('x.jsonl:1', '', reasoning_tasks.prompt_completion(item)
                          if fmt == 'prompt_completion' else reasoning_tasks.chat(item))
  example = formats.encode(record, fmt, tokenizer)
  before_answer = example.ids[:np.argmax(example.loss_mask)].tolist()
  assert reasoning_accuracy.prompt_ids(tokenizer, item['question'], fmt) == before_answer
  if fmt == 'chat':
    assert before_answer == chat.encode(tokenizer, [{'role': 'user', 'content': item['question']}],
                                        add_generation_prompt=True)[0]


def test_accuracy_is_the_share_score_answer_rates_correct_per_task_then_over_tasks():
  records = [{'task': 'a', 'item': {'answer': '1'}}, {'task': 'a', 'item': {'answer': '2'}},
             {'task': 'b', 'item': {'answer': '3'}}]
  partial = lambda answer, item: 1.0 if answer == item['answer'] else 0.01
  got = reasoning_accuracy.accuracies(records, ['1', 'x', '3'], partial)
  assert got == {'a': 0.5, 'b': 1.0, 'all': 0.75}


def test_reasoning_gym_items_score_their_own_answers_and_held_out_operands_are_longer():
  reasoning_gym = pytest.importorskip('reasoning_gym')
  splits = reasoning_tasks.make_splits(reasoning_gym.create_dataset, train_size=50, test_size=5)
  score = lambda answer, item: reasoning_gym.get_score_answer_fn(
      item['metadata']['source_dataset'])(answer, item)
  for split in ('test_id', 'test_ood'):
    got = reasoning_accuracy.accuracies(
        splits[split], [r['item']['answer'] for r in splits[split]], score)
    assert got == {**{task: 1.0 for task in reasoning_tasks.TASKS}, 'all': 1.0}
  digits = lambda split: [len(n) for r in splits[split] if r['task'] == 'chain_sum'
                          for n in r['item']['metadata']['expression'].split()[::2]]
  assert max(digits('train')) == 2 and min(digits('test_ood')) == 3
  words = lambda split: [len(r['item']['answer']) for r in splits[split]
                         if r['task'] == 'spell_backward']
  assert max(words('train')) <= 5 < 7 <= min(words('test_ood'))


def test_dpo_pairs_reject_a_wrong_answer_and_held_out_questions_are_the_eval_split(tmp_path):
  import reasoning_pairs  # pylint: disable=g-import-not-at-top
  assert [reasoning_pairs.perturbed(a) for a in ('41', '-3', 'olleh', 'aa')] == [
      '42', '-2', 'loleh', 'aaax']
  item = {'question': '2 + 2 =', 'answer': '4'}
  assert reasoning_pairs.pair(item, '5', correct=False)['rejected'] == ' 5'
  assert reasoning_pairs.pair(item, '4', correct=True)['rejected'] == ' 5'
  assert reasoning_pairs.pair(item, '', correct=False)['rejected'] == ' 5'
  candidates = [(reasoning_pairs.pair({'question': f'{i} + 1 =', 'answer': str(i + 1)}, '0',
                                      False), i % 3 == 0) for i in range(60)]
  kept = [(r, held_out) for r, held_out in candidates if reasoning_pairs.keep(r, held_out, 0.5)]
  path = tmp_path / 'pairs.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r, _ in kept))
  data = config_lib.base_config().data
  data.update(source='jsonl', format='preference', path=str(path), val_fraction=0.5)
  evaluated = [r.fields['prompt'] for r in formats.load_records(data, 'eval')]
  assert evaluated == [r['prompt'] for r, held_out in kept if held_out] and evaluated
  assert len(formats.load_records(data, 'train')) == sum(not h for _, h in kept) > 0
