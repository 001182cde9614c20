"""DPO preference pairs on scripts/reasoning_tasks.py's questions, rejected answers sampled from
an SFT run.

  python scripts/reasoning_pairs.py --config=configs/sft_reasoning.py:/tmp/stdlib_tiny,/tmp/reasoning \
      --workdir=/tmp/sft_full --data_dir=/tmp/reasoning   # writes /tmp/reasoning/pairs.jsonl

For each training question and each in-distribution held-out one (test_id), chosen is the
correct answer and rejected a wrong one the run itself samples (temperature 1, one draw, judged by
the task's score_answer), or, when its draw is right, the correct answer perturbed (an integer
one off, a string with its first two characters swapped). The records are
{"prompt", "chosen", "rejected"} as prompt_completion writes them (a space before the answer).

pairs.jsonl is meant for --config.data.val_fraction=0.5: a record is in the eval split when the
hash of its line is below 0.5 (data/formats.py), so the file keeps the training questions'
pairs that hash above it and the held-out questions' pairs that hash below: the eval split
logged during DPO (eval/rewards/accuracies) is then held-out questions alone.
"""
import json
import pathlib

from absl import flags
import numpy as np

from lepton_jax import cli, sample, sharding
from lepton_jax.data import sources

import reasoning_accuracy  # pylint: disable=g-bad-import-order  (scripts/, beside this one)
import reasoning_tasks

flags.DEFINE_integer('train_questions', 1500, 'How many training questions to sample for.')
flags.DEFINE_float('val_fraction', 0.5, 'The data.val_fraction the DPO run reads the file with.')
flags.DEFINE_integer('seed', 0, 'Seed of the sampled answers.')

PAIRS = 'pairs.jsonl'


def perturbed(answer: str) -> str:
  """A wrong answer near the right one: an integer one off, or the first two characters of a
  string swapped (a letter added where that changes nothing)."""
  try:
    return str(int(answer) + 1)
  except ValueError:
    swapped = answer[1::-1] + answer[2:]
    return swapped if swapped != answer else answer + answer[-1:] + 'x'


def pair(item: dict, sampled: str, correct: bool) -> dict:
  rejected = sampled if sampled and not correct else perturbed(item['answer'])
  return {'prompt': item['question'], 'chosen': ' ' + item['answer'], 'rejected': ' ' + rejected}


def keep(record: dict, held_out: bool, val_fraction: float) -> bool:
  """Whether `record` falls in the split its question belongs to (eval: held out)."""
  return (sources.hash_fraction(json.dumps(record)) < val_fraction) == held_out


def main(argv):
  f = cli.FLAGS
  config = f.config
  with cli.command_line('reasoning_pairs', argv):
    import reasoning_gym  # pylint: disable=g-import-not-at-top  (the tasks extra)
    data_dir = pathlib.Path(f.data_dir)
    # The training items are rebuilt from their seeds; the held-out ones are in test_id.jsonl.
    # --train_size and --test_size are reasoning_tasks.py's flags: give the ones it wrote with.
    splits = reasoning_tasks.make_splits(reasoning_gym.create_dataset, f.train_size,
                                         f.test_size)
    written = {json.loads(line)['prompt'] for line in
               (data_dir / 'train.jsonl').read_text(encoding='utf-8').splitlines()}
    if {r['item']['question'] for r in splits['train']} != written:
      raise ValueError(f'{data_dir}/train.jsonl was written with other --train_size or '
                       '--test_size than these flags give')
    order = np.random.default_rng(f.seed).permutation(len(splits['train']))
    questions = ([(splits['train'][i]['item'], False) for i in order[:f.train_questions]] +
                 [(r['item'], True) for r in reasoning_accuracy.read(data_dir / 'test_id.jsonl')])
    model, variables, tokenizer = sample.load(config, f.workdir)
    with sharding.use_mesh(sharding.make_mesh(config.mesh), config.mesh.rules):
      answers = reasoning_accuracy.answers(
          model, variables, tokenizer, [item['question'] for item, _ in questions],
          'prompt_completion', f.max_new_tokens, temperature=1.0, seed=f.seed)
    score = lambda answer, item: reasoning_gym.get_score_answer_fn(
        item['metadata']['source_dataset'])(answer, item) == 1.0
    records, sampled_wrong = [], 0
    for (item, held_out), answer in zip(questions, answers):
      correct = score(answer, item)
      record = pair(item, answer, correct)
      if keep(record, held_out, f.val_fraction):
        records.append(record)
        sampled_wrong += bool(answer) and not correct
    (data_dir / PAIRS).write_text(''.join(json.dumps(r) + '\n' for r in records),
                                  encoding='utf-8')
  print(json.dumps({'pairs': len(records), 'rejected_sampled': sampled_wrong,
                    'rejected_perturbed': len(records) - sampled_wrong}), flush=True)


if __name__ == '__main__':  # --data_dir (reasoning_accuracy's flag): where pairs.jsonl goes.
  flags.mark_flag_as_required('data_dir')
  cli.run(main)
