"""Task accuracy of a lepton run on scripts/reasoning_tasks.py's held-out splits: greedy answers
scored by each reasoning-gym task's own score_answer.

  python scripts/reasoning_accuracy.py --config=configs/sft_reasoning.py:/tmp/stdlib_tiny,/tmp/reasoning \
      --workdir=/tmp/sft_full --data_dir=/tmp/reasoning [--format=chat] [--accuracy_json=accuracy.json]

The same --config and --workdir as lepton-train (the pretrained run before SFT: its own config,
configs/stdlib_tiny.py). Every question of test_id.jsonl and test_ood.jsonl is put to the run's
latest checkpoint as the run trained on it (--format: prompt_completion's bos and prompt ids, or
chat's user turn and generation prompt) and answered greedily through lepton_jax.generate up to
an eos id or --max_new_tokens; the answer, stripped, goes to score_answer. Prints each task's
accuracy and the mean over tasks per split. Needs reasoning-gym (the `tasks` extra).
"""
from collections.abc import Callable, Sequence
import json
import pathlib

from absl import flags
import numpy as np

from lepton_jax import cli, generate, sample, sharding
from lepton_jax.data import chat, tokenizers

flags.DEFINE_string('data_dir', None, 'The directory scripts/reasoning_tasks.py wrote.')
flags.DEFINE_enum('format', 'prompt_completion', ['prompt_completion', 'chat'],
                  'How the questions are put to the model: as the run trained on them.')
flags.DEFINE_integer('max_new_tokens', 16, 'Tokens an answer may take.', lower_bound=1)
flags.DEFINE_string('accuracy_json', None, 'Also write the accuracies (and a few answers) to this JSON.')

SPLITS = ('test_id', 'test_ood')


def prompt_ids(tokenizer: tokenizers.Tokenizer, question: str, fmt: str) -> list[int]:
  """The ids a run trained on `fmt` records saw before its answer (data/formats.py)."""
  if fmt == 'chat':
    return chat.encode(tokenizer, [{'role': 'user', 'content': question}],
                       add_generation_prompt=True)[0]
  return tokenizers.document_start(tokenizer) + tokenizer.encode(question)


def answers(model, variables, tokenizer: tokenizers.Tokenizer, questions: Sequence[str],
            fmt: str, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
            batch: int = 128) -> list[str]:
  """Each question's answer, greedy by default, up to its first stop token (the tokenizer's
  eos ids), stripped; a sampled one drawn from `seed` and the question's place in its batch."""
  texts = []
  for start in range(0, len(questions), batch):
    prompts = [prompt_ids(tokenizer, q, fmt) for q in questions[start:start + batch]]
    new = generate.generate(model, variables, prompts, max_new_tokens, temperature,
                            seed=seed + start, stop_ids=tokenizer.eos_ids)
    texts += [tokenizer.decode(tokens).strip() for tokens in new]
  return texts


def accuracies(records: Sequence[dict], given: Sequence[str],
               score: Callable[[str, dict], float]) -> dict[str, float]:
  """Per task, the share of the `given` answers that `score(answer, item)` rates 1 (correct:
  reasoning-gym gives a wrong answer 0, or 0.01 and other partial credit for some tasks), and
  the mean of those over tasks ('all')."""
  scores = {}
  for record, answer in zip(records, given, strict=True):
    scores.setdefault(record['task'], []).append(score(answer, record['item']) == 1.0)
  result = {task: float(np.mean(values)) for task, values in scores.items()}
  result['all'] = float(np.mean(list(result.values())))
  return result


def read(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text(encoding='utf-8').splitlines() if line]


def main(argv):
  f = cli.FLAGS
  config = f.config
  with cli.command_line('reasoning_accuracy', argv):
    import reasoning_gym  # pylint: disable=g-import-not-at-top  (the tasks extra)
    score = lambda answer, item: reasoning_gym.get_score_answer_fn(
        item['metadata']['source_dataset'])(answer, item)
    model, variables, tokenizer = sample.load(config, f.workdir)
    results = {}
    with sharding.use_mesh(sharding.make_mesh(config.mesh), config.mesh.rules):
      for split in SPLITS:
        records = read(pathlib.Path(f.data_dir) / f'{split}.jsonl')
        greedy = answers(model, variables, tokenizer, [r['prompt'] for r in records], f.format,
                         f.max_new_tokens)
        results[split] = accuracies(records, greedy, score)
        firsts = {r['task']: i for i, r in reversed(list(enumerate(records)))}
        results[f'{split}_answers'] = [  # One per task: what the numbers stand for.
            {'prompt': records[i]['prompt'], 'answer': greedy[i],
             'expected': records[i]['item']['answer']} for i in firsts.values()]
  if f.accuracy_json:
    pathlib.Path(f.accuracy_json).write_text(json.dumps(results, indent=2))
  print(json.dumps({split: results[split] for split in SPLITS}), flush=True)


if __name__ == '__main__':
  flags.mark_flag_as_required('data_dir')
  cli.run(main)
