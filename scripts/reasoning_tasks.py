"""Arithmetic and string tasks from reasoning-gym for SFT, with held-out splits to score.

  python scripts/reasoning_tasks.py --questions_dir=/tmp/reasoning

Writes, from fixed seeds, train.jsonl (prompt_completion records: the task's question
as the prompt, ' ' + its answer as the completion) and train_chat.jsonl (the same as chats: a user
turn and an assistant turn), and two scored splits: test_id.jsonl (the training distribution,
other seeds, no question that is also in train) and test_ood.jsonl (longer operands than any
training question: more digits, larger numbers, longer words; TASKS says which), whose records
keep the reasoning-gym item that scripts/reasoning_accuracy.py scores answers against. Needs
reasoning-gym (the `tasks` extra).
"""
from collections.abc import Callable, Iterable, Sequence
import json
import pathlib

from absl import app, flags
import numpy as np

flags.DEFINE_string('questions_dir', None, 'Write the task files here.')
flags.DEFINE_integer('train_size', 1500, 'Training records per task.')
flags.DEFINE_integer('test_size', 100, 'Scored questions per task and split.')

# Each task's (training difficulty, held-out out-of-distribution difficulty): reasoning-gym's
# config fields. The held-out operands are longer than any seen in training.
TASKS = {
    'chain_sum': (dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
                  dict(min_terms=2, max_terms=3, min_digits=3, max_digits=3)),
    'basic_arithmetic': (dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2,
                              operators=('+', '-', '*'), allow_parentheses=False,
                              allow_negation=False),
                         dict(min_terms=2, max_terms=2, min_digits=3, max_digits=3,
                              operators=('+', '-', '*'), allow_parentheses=False,
                              allow_negation=False)),
    'count_bits': (dict(min_n=1, max_n=999), dict(min_n=1000, max_n=99999)),
    'gcd': (dict(min_value=1, max_value=99), dict(min_value=100, max_value=999)),
    'spell_backward': (dict(min_word_len=3, max_word_len=5), dict(min_word_len=7,
                                                                  max_word_len=9)),
}
# reasoning-gym draws item i of a dataset from Random(seed + i): datasets whose seeds lie closer
# than their sizes share items. Each split and task gets seeds of its own, 10**6 apart.
SEEDS = {'train': 1, 'test_id': 2, 'test_ood': 3}
SPLITS = ('test_id', 'test_ood')


def prompt_completion(item: dict) -> dict:
  return {'prompt': item['question'], 'completion': ' ' + item['answer']}


def chat(item: dict) -> dict:
  return {'messages': [{'role': 'user', 'content': item['question']},
                       {'role': 'assistant', 'content': item['answer']}]}


def held_out(items: Iterable[dict], seen: set[str], size: int, task: str) -> list[dict]:
  """The first `size` items whose question is not in `seen` (the training questions)."""
  kept = [item for item in items if item['question'] not in seen][:size]
  if len(kept) < size:
    raise ValueError(f'{task}: only {len(kept)} held-out questions are not training ones; '
                     'widen its held-out difficulty or lower --test_size')
  return kept


def make_splits(create: Callable[..., Sequence[dict]], train_size: int,
                test_size: int) -> dict[str, list[dict]]:
  """{'train': [{'task', 'item'}], 'test_id': ..., 'test_ood': ...} of every task in TASKS, with
  `create(name, size, seed, **difficulty)` (reasoning_gym.create_dataset) making the items."""
  splits = {'train': [], **{split: [] for split in SPLITS}}
  for index, (task, (train_difficulty, ood_difficulty)) in enumerate(TASKS.items()):
    seed = lambda split: (SEEDS[split] * len(TASKS) + index) * 10**6
    train = list(create(task, size=train_size, seed=seed('train'), **train_difficulty))
    seen = {item['question'] for item in train}
    draw = 10 * test_size  # Enough for the duplicates of training questions to be dropped.
    test_id = held_out(create(task, size=draw, seed=seed('test_id'), **train_difficulty),
                       seen, test_size, task)
    test_ood = held_out(create(task, size=draw, seed=seed('test_ood'), **ood_difficulty),
                        seen, test_size, task)
    for split, items in (('train', train), ('test_id', test_id), ('test_ood', test_ood)):
      splits[split] += [{'task': task, 'item': item} for item in items]
  return splits


def write(out_dir: str, splits: dict[str, list[dict]], seed: int = 0) -> None:
  """train.jsonl and train_chat.jsonl (shuffled by `seed`), and the scored test_*.jsonl: each
  a prompt_completion record with its task and the reasoning-gym item score_answer reads."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  lines = lambda records: ''.join(json.dumps(r) + '\n' for r in records)
  order = np.random.default_rng(seed).permutation(len(splits['train']))
  train = [splits['train'][i]['item'] for i in order]
  (out / 'train.jsonl').write_text(lines(map(prompt_completion, train)), encoding='utf-8')
  (out / 'train_chat.jsonl').write_text(lines(map(chat, train)), encoding='utf-8')
  for split in SPLITS:
    (out / f'{split}.jsonl').write_text(lines(
        {**prompt_completion(r['item']), 'task': r['task'], 'item': r['item']}
        for r in splits[split]), encoding='utf-8')


def main(argv):
  del argv
  f = flags.FLAGS
  import reasoning_gym  # pylint: disable=g-import-not-at-top  (the tasks extra)
  splits = make_splits(reasoning_gym.create_dataset, f.train_size, f.test_size)
  write(f.questions_dir, splits)
  print(json.dumps({split: len(items) for split, items in splits.items()}))


if __name__ == '__main__':
  flags.mark_flag_as_required('questions_dir')
  app.run(main)
