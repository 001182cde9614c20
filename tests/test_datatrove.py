"""data.filters as DataTrove stages on its local executor: the same documents survive as with the
in-memory filters."""
import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip('datatrove')

from lepton_jax import config_lib  # pylint: disable=g-import-not-at-top
from lepton_jax.data import filters  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).parent.parent
STDLIB = pathlib.Path(json.__file__).parent.parent  # Real text nobody here wrote.


def corpus(tmp_path):
  modules = sorted(STDLIB.glob('*.py'))[:24]
  docs = [p.read_text(encoding='utf-8') for p in modules]
  near = docs[3].replace('return', 'yield', 1)  # One word changed in a long file.
  exact = '\n'.join(line + '  ' for line in docs[5].split('\n'))  # Trailing spaces only.
  leaked = docs[7]  # The evaluation file itself.
  secret = docs[9] + '\n# maintainer: jane.doe@corp-mail.org\n'
  eval_file = tmp_path / 'eval.txt'
  eval_file.write_text(leaked)
  train = [*docs[:7], *docs[8:9], secret, *docs[10:], near, exact, leaked]
  shards = tmp_path / 'shards'
  shards.mkdir()
  for i in range(2):
    (shards / f'part-{i}.jsonl').write_text(
        ''.join(json.dumps({'text': t}) + '\n' for t in train[i::2]))
  return train[0::2] + train[1::2], shards, eval_file  # The corpus in shard order.


def test_prepare_corpus_on_datatrove_keeps_what_the_in_memory_filters_keep(tmp_path):
  train, shards, eval_file = corpus(tmp_path)
  steps = ('decontaminate', 'pii', 'near_dedup', 'exact_dedup')
  data_config = config_lib.base_config().data
  data_config.filters.steps = steps
  data_config.filters.decontaminate.update(validation=False, files=(str(eval_file),))
  data_config.filters.near_dedup.num_perm = 64  # 5 LSH bands: 5 tasks in DataTrove's stage 2.
  expected = filters.apply(data_config, train).documents
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, 'scripts/prepare_corpus.py', '--config=configs/stdlib_tiny.py',
       f'--out={out}', '--executor=datatrove', f'--input={shards}/*.jsonl', '--tasks=2',
       f'--config.data.filters.steps={steps!r}',
       '--config.data.filters.decontaminate.validation=False',
       '--config.data.filters.near_dedup.num_perm=64',
       f'--config.data.filters.decontaminate.files=("{eval_file}",)'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  kept = [json.loads(line)['text'] for shard in sorted(out.glob('train-*.jsonl'))
          for line in shard.read_text().splitlines()]
  # The near copy, the exact copy and the leaked file go; the e-mail address is redacted.
  assert len(expected) == len(train) - 3
  assert sorted(kept) == sorted(expected)
  assert not any('jane.doe@corp-mail.org' in t for t in kept)
  report = json.loads((out / filters.REPORT_FILE).read_text())
  assert report['kept'] == len(expected) and report['steps'] == list(steps)
  assert f'Wrote {len(expected)} documents' in result.stdout


def test_prepare_corpus_on_datatrove_needs_input(tmp_path):
  sys.path.insert(0, str(REPO / 'scripts'))
  import prepare_corpus  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.data.filters.steps = ('pii',)
  with pytest.raises(ValueError, match='--executor=datatrove cleans --input'):
    prepare_corpus.prepare(config, str(tmp_path / 'out'), 10, executor='datatrove')
