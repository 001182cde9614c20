"""scripts/corpus_stats.py: the docs/data.md counts on a text file's paragraphs (the CLI), on a
mocked tfds source and on a slice of the stdlib, against what each test planted."""
import json
import pathlib
import random
import re
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from lepton_jax import config_lib

REPO = pathlib.Path(__file__).parent.parent
sys.path.insert(0, str(REPO / 'scripts'))
import corpus_stats  # pylint: disable=g-import-not-at-top,wrong-import-position

RNG = random.Random(0)
VOCAB = [''.join(RNG.choices('abcdefghijklmnopqrstuvwxyz', k=7)) for _ in range(2000)]


def prose(words: int) -> str:
  """Random words from VOCAB, so no two calls share a 5-gram (let alone a 13-gram)."""
  return ' '.join(RNG.choices(VOCAB, k=words))


def lines_of(text: str, paragraph: str) -> list[int]:
  """The lines `paragraph` starts on in `text`, each time it is there."""
  return [text.count('\n', 0, m.start()) + 1 for m in re.finditer(re.escape(paragraph), text)]


def test_text_paragraphs_report_the_planted_duplicates_copy_and_email(tmp_path):
  repeated = 'MENENIUS:\nWhat work is here!'
  near = prose(120)
  near_words = near.split()
  near_words[60] = 'changed'
  copied, email = 'CORIOLANUS:\n' + prose(40), f'QUEEN:\nwrite to queen@palace.org {prose(20)}'
  train = [prose(30), repeated, prose(50), near, repeated, prose(30), ' '.join(near_words),
           repeated, copied, prose(25)]
  evals = [prose(30), copied, email, prose(35)]
  head = '\n\n'.join(train) + '\n\n\n\n'
  text = head + '\n\n'.join(evals) + '\n'
  path = tmp_path / 'play.txt'
  path.write_text(text)
  # The cut lands in the blank lines after the train paragraphs.
  val_fraction = (len(text) - len(head) + 2) / len(text)
  result = subprocess.run(
      [sys.executable, 'scripts/corpus_stats.py', '--config=configs/shakespeare_char.py',
       f'--config.data.path={path}', f'--config.data.val_fraction={val_fraction!r}',
       '--unit=paragraph'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  stats = json.loads(result.stdout)

  def names(paragraph):
    return [f'play.txt:{line}' for line in lines_of(text, paragraph)]

  repeats, copies, (near_copy,) = names(repeated), names(copied), names(' '.join(near_words))
  assert len(repeats) == 3 and len(copies) == 2
  assert (stats['train_paragraphs'], stats['eval_paragraphs']) == (10, 4)
  assert stats['exact_cluster_paragraphs'] == [repeats, copies]
  assert stats['exact_cluster_texts'] == [repeated, copied[:80]]
  assert (stats['exact_paragraphs_dropped'], stats['exact_eval_paragraphs_with_train_copy']) == (3, 1)
  # Near duplicates: the exact ones, and the long paragraph with one word changed.
  assert stats['near_cluster_paragraphs'] == [
      repeats, names(near) + [near_copy], copies]
  assert (stats['near_paragraphs_dropped'], stats['near_eval_paragraphs_with_train_copy']) == (4, 1)
  for tokens in ('words', 'code'):
    contamination = stats[f'contamination_{tokens}']
    assert contamination['top'][0] == [1.0, copies[1]]
    assert [share for share, _ in contamination['top'][1:]] == [0.0] * 3
    assert contamination['paragraphs_over_0.8'] == 1
  assert stats['pii_findings']['email'] == 1 and stats['pii_paragraphs'] == {'email': 1}


def tfds_config():
  config = config_lib.base_config()
  config.data.update(source='tfds', tfds_name='lm1b', text_key='text')
  return config


def test_mocked_tfds_source_counts_its_records():
  unique = [prose(40) for _ in range(4)]
  records = {'train': [{'text': t.encode()} for t in
                       (unique[0], unique[1], unique[0], 'mail me: someone@corp.net')],
             'test': [{'text': t.encode()} for t in (unique[1], unique[2], unique[3])]}
  with tfds.testing.mock_data(
      as_data_source_fn=lambda builder, split, **kwargs: records[split]):
    stats = corpus_stats.corpus_stats(tfds_config(), 'document')
  assert (stats['train_documents'], stats['eval_documents']) == (4, 3)
  assert stats['exact_cluster_documents'] == [['lm1b/train[0]', 'lm1b/train[2]'],
                                              ['lm1b/train[1]', 'lm1b/test[0]']]
  assert stats['near_cluster_documents'] == stats['exact_cluster_documents']
  assert stats['exact_eval_documents_with_train_copy'] == 1
  words = stats['contamination_words']
  assert words['top'] == [(1.0, 'lm1b/test[0]'), (0.0, 'lm1b/test[2]'), (0.0, 'lm1b/test[1]')]
  assert words['mean'] == pytest.approx(1 / 3, abs=1e-4) and words['documents_over_0.5'] == 1
  assert stats['pii_findings']['email'] == 1 and stats['pii_documents'] == {'email': 1}


def test_filtered_config_is_refused():
  config = tfds_config()
  config.data.filters.steps = ('pii',)
  with pytest.raises(ValueError, match=r"filters.steps=\('pii',\).*raw corpus"):
    corpus_stats.corpus_stats(config, 'document')


def test_stdlib_keeps_the_keys_docs_data_md_shows():
  config = config_lib.base_config()
  config.data.include = ('json/*',)
  stats = corpus_stats.corpus_stats(config, 'document')
  assert list(stats) == [
      'train_files', 'eval_files', 'near_dedup_seconds',
      *(f'{kind}_{key}' for kind in ('exact', 'near') for key in (
          'clusters', 'files_in_clusters', 'files_dropped', 'eval_files_with_train_copy',
          'cluster_files')),
      'contamination_words', 'contamination_code', 'pii_seconds', 'pii_findings', 'pii_files']
  assert set(stats['contamination_words']) == {'mean', 'median', 'files_over_0.5',
                                               'files_over_0.8', 'top'}
  assert stats['train_files'] + stats['eval_files'] == 5  # json/: __init__, decoder, encoder ...
  assert all(name.startswith('json/') for _, name in stats['contamination_code']['top'])
