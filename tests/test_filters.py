"""Tests of lepton_jax.data.filters: dedup, decontamination, PII, quality, and the pipeline and
training runs that apply them (CPU, offline)."""
import codecs
import json
import os
import pathlib
import random
import subprocess
import sys
import this

import numpy as np
import pytest

from lepton_jax import config_lib
from lepton_jax import data
from lepton_jax import train
from lepton_jax.data import filters
from lepton_jax.data import pipeline
from lepton_jax.data import sources
from lepton_jax.data import tokenizers
from tests.conftest import read_metrics, tiny_config

STDLIB_MODULES = ('textwrap.py', 'shlex.py', 'string.py', 'tabnanny.py', 'functools.py',
                  'heapq.py', 'bisect.py', 'colorsys.py', 'argparse.py', 'inspect.py', 'ast.py',
                  'typing.py', 'dataclasses.py', 'enum.py', 'pathlib.py' if (
                      sources.stdlib_root() / 'pathlib.py').exists() else 'glob.py',
                  'contextlib.py', 'csv.py', 'difflib.py', 'fractions.py', 'statistics.py')
ZEN = codecs.decode(this.s, 'rot13')


def stdlib_text(name):
  return (sources.stdlib_root() / name).read_text(encoding='utf-8')


def make_config(**data_overrides):
  config = config_lib.base_config()
  config.seq_len = 8
  config.batch_size = 4
  config.data.update(data_overrides)
  return config


def corpus_config(tmp_path, texts, **data_overrides):
  """A text source of one file per text (sorted by name, so in order), all for training."""
  corpus = tmp_path / 'docs'
  corpus.mkdir(exist_ok=True)
  for i, text in enumerate(texts):
    (corpus / f'{i:03d}.txt').write_text(text, encoding='utf-8')
  return make_config(source='text', path=str(corpus), tokenizer='bytes', val_fraction=0.0,
                     **data_overrides)


# PII: planted findings in real standard-library code, and look-alikes that must survive.

PLANTED = (  # (kind, text planted)
    ('email', 'jane.doe@gmail.com'),
    ('email', 'ops-team+alerts@mail.acme-corp.io'),
    ('ip_address', '8.8.4.4'),
    ('ip_address', '151.101.1.69'),
    ('ip_address', '2a03:2880:f12f:83:face:b00c:0:25de'),
    ('phone', '(415) 555-0132'),
    ('phone', '+1 212-555-0198'),
    ('credit_card', '4012 8888 8888 1881'),
    ('credit_card', '5555-5555-5555-4444'),
    ('credit_card', '378282246310005'),
    ('key', 'AKIAJ7Q3V2X9LMNB4RTE'),
    ('key', 'ghp_8fK2mQ9xLp4Rt7Vw1Zs6Yb3Nc5Hd0Jg2Ae4U'),
    ('key', 'sk_live_Wq3eR5tY7uI9oP1aS3dF5gH7'),
    ('key', 'xoxb-2718281828-3141592653-a7f3k9q2m5x8'),
    ('key', 'Zr8qL2vX9pT4mW7cN1bQ'),  # Assigned to api_key below.
    ('key', '-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo\n'
            '4lgOEePzNm0tRgeLezV6ffAt0gunVTLw\n-----END RSA PRIVATE KEY-----'),
)
LOOK_ALIKES = (
    "__version__ = '1.2.3.4'", "VERSION = 'v10.0.0.1'", "LOCALHOST = '127.0.0.1'",
    "ROUTER = '192.168.0.10'", "PRIVATE = '10.1.2.3'", "DOC_NET = '203.0.113.7'",
    "DOC_V6 = '2001:db8::8a2e:370:7334'", "LOOPBACK_V6 = '::1'", 'tail = items[1::2]',
    "CLOCK = '12:30:45'", "OID = '1.3.6.1.4.1.311.2'",
    "DIGEST = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'",
    "MD5 = 'd41d8cd98f00b204e9800998ecf8427e'",
    "REQUEST_ID = 'c9bf9e57-1685-4c89-bafb-ff5af830be8a'",
    "MAINTAINER = 'maintainer@example.com'", "BOT = 'bot@ci.example.org'",
    "NOT_A_CARD = '4012 8888 8888 1882'", 'LIMIT = 4611686018427387904',
    'password = "password"', 'token = os.environ["API_TOKEN"]', 'secret = "${SECRET}"',
    "DATE = '2024-01-15'", 'PORT = 8080',
)


def planted_code():
  """Real stdlib modules with PLANTED and LOOK_ALIKES inserted as lines of code at spread-out
  places; returns (text, the text redaction must give, [(kind, planted) of each plant])."""
  lines = ''.join(stdlib_text(n) for n in ('shlex.py', 'string.py', 'bisect.py')).split('\n')
  placeholders = {'email': '<EMAIL>', 'ip_address': '<IP_ADDRESS>', 'phone': '<PHONE>',
                  'credit_card': '<CREDIT_CARD>', 'key': '<KEY>'}
  plants = [(f'CONTACT_{i} = {value!r}' if kind != 'key' or 'PRIVATE' in value else (
      f'api_key = "{value}"' if value.startswith('Zr8') else f'TOKEN_{i} = "{value}"'),
             kind, value) for i, (kind, value) in enumerate(PLANTED)]
  plants = [(line.replace(repr(value), f"'''{value}'''") if '\n' in value else line, kind, value)
            for line, kind, value in plants]
  plants += [(line, None, None) for line in LOOK_ALIKES]
  random.Random(0).shuffle(plants)
  text, expected = list(lines), list(lines)
  step = len(lines) // (len(plants) + 1)
  for i, (line, kind, value) in reversed(list(enumerate(plants, start=1))):
    text.insert(i * step, line)
    expected.insert(i * step, line.replace(value, placeholders[kind]) if kind else line)
  return '\n'.join(text), '\n'.join(expected), [(k, v) for _, k, v in plants if k]


def test_redact_pii_finds_every_planted_secret_and_keeps_the_code_byte_for_byte():
  text, expected, plants = planted_code()
  redacted, counts = filters.redact_pii(text)
  found = [v for _, v in plants if v not in redacted]
  false_alarms = [line for line in LOOK_ALIKES if line not in redacted]
  recall = len(found) / len(plants)
  precision = len(found) / (len(found) + len(false_alarms))
  assert (recall, precision) == (1.0, 1.0), (set(v for _, v in plants) - set(found), false_alarms)
  assert redacted == expected  # Everything but the planted values, byte for byte.
  assert counts == {kind: sum(k == kind for k, _ in plants) for kind in counts}


def test_redact_pii_leaves_clean_code_alone_and_counts_every_kind():
  code = stdlib_text('functools.py')
  assert filters.redact_pii(code) == (code, dict.fromkeys(
      ('email', 'ip_address', 'phone', 'credit_card', 'key'), 0))
  assert filters.redact_pii('mail a@b.com, b@c.net and a@b.com') == (
      'mail <EMAIL>, <EMAIL> and <EMAIL>', {'email': 3, 'ip_address': 0, 'phone': 0,
                                            'credit_card': 0, 'key': 0})


def test_pii_allow_list_from_config_keeps_what_it_names(tmp_path):
  texts = ['write to guido@python.org or to 8.8.8.8', 'nothing here']
  config = corpus_config(tmp_path, texts)
  config.data.filters.steps = ('pii',)
  config.data.filters.pii.allow = (r'[a-z]+@python\.org',)
  (first, second) = data.load_documents(config.data, 'train')
  assert (first, second) == ('write to guido@python.org or to <IP_ADDRESS>', 'nothing here')


# Near and exact duplicates.


def near_copy(text, seed):
  """text with one line in 40 changed (a word appended): a near duplicate, not an exact one."""
  rng = random.Random(seed)
  lines = text.split('\n')
  for i in rng.sample(range(len(lines)), max(1, len(lines) // 40)):
    lines[i] += ' # edited'
  return '\n'.join(lines)


def planted_duplicates():
  """20 distinct stdlib modules followed by a near copy of each of the first 10."""
  originals = [stdlib_text(name) for name in STDLIB_MODULES]
  return originals + [near_copy(originals[i], i) for i in range(10)]


def test_near_duplicates_finds_planted_copies_and_keeps_the_rest_apart():
  clusters = filters.near_duplicates(planted_duplicates())
  assert clusters == [[i, 20 + i] for i in range(10)]  # Recall 1, no false pair.


def test_near_duplicates_threshold_and_edge_cases():
  docs = ['a b c d e f g h', 'a b c d e f g x', 'completely different words here', '', '']
  assert filters.near_duplicates(docs, threshold=0.3, ngram=2) == [[0, 1]]
  assert filters.near_duplicates(docs, threshold=0.9, ngram=2) == []  # Jaccard 6/8.
  assert filters.near_duplicates(['same text', 'same text', 'same text']) == [[0, 1, 2]]


def test_near_duplicates_are_identical_across_runs_and_hash_seeds(tmp_path):
  docs = planted_duplicates()
  (tmp_path / 'docs.json').write_text(json.dumps(docs))
  script = ('import json, sys; from lepton_jax.data import filters; '
            'print(json.dumps(filters.near_duplicates(json.load(open(sys.argv[1])), seed=3)))')
  results = set()
  for hash_seed in ('1', '2'):
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    results.add(subprocess.run([sys.executable, '-c', script, str(tmp_path / 'docs.json')],
                               env=env, capture_output=True, text=True, check=True).stdout)
  assert results == {json.dumps(filters.near_duplicates(docs, seed=3)) + '\n'}


def test_exact_and_near_dedup_filters_keep_the_first_of_each_cluster(tmp_path):
  module = stdlib_text('heapq.py')
  texts = [module, 'other\r\ntext  \n', stdlib_text('bisect.py'), module + '\n\n',
           'other\ntext', near_copy(module, 0)]
  config = corpus_config(tmp_path, texts)
  config.data.filters.steps = ('exact_dedup',)
  assert data.load_documents(config.data, 'train') == [texts[0], texts[1], texts[2], texts[5]]
  config.data.filters.steps = ('exact_dedup', 'near_dedup')
  assert data.load_documents(config.data, 'train') == texts[:3]
  report = filters.apply(config.data, sources.SOURCES['text'](config.data, 'train')).report
  assert [(s['name'], s['dropped']) for s in report['steps']] == [('exact_dedup', 2),
                                                                   ('near_dedup', 1)]
  assert report['steps'][0]['details'] == {'clusters': 2} and report['kept'] == 3


# Contamination and decontamination.


def test_contamination_of_copied_unrelated_and_hand_checked_documents():
  train_docs = [stdlib_text('textwrap.py'), stdlib_text('shlex.py')]
  copied, unrelated = stdlib_text('shlex.py'), stdlib_text('heapq.py')
  shares = filters.contamination(train_docs, [copied, unrelated])
  assert shares[0] == 1.0 and shares[1] < 0.02
  # Eval 3-grams: (a b c), (b c x), (c x y); only the first is in training. Case is ignored.
  assert filters.contamination(['A b C d e'], ['a b c x y', 'a b', 'zz', ''], n=3) == [
      pytest.approx(1 / 3), 0.0, 0.0, 0.0]
  assert filters.contamination(['a b'], ['a, b!'], n=3) == [1.0]  # Shorter than n: one n-gram.


def test_decontaminate_drops_train_copies_of_validation_and_given_files(tmp_path):
  eval_file = tmp_path / 'held_out.jsonl'
  eval_file.write_text(json.dumps({'context': stdlib_text('colorsys.py'), 'label': 0}) + '\n')
  texts = [stdlib_text('heapq.py'), stdlib_text('colorsys.py'), stdlib_text('bisect.py')]
  config = corpus_config(tmp_path, texts)
  config.data.filters.steps = ('decontaminate',)
  config.data.filters.decontaminate.update(validation=False, files=(str(eval_file),),
                                           tokens='code')
  assert data.load_documents(config.data, 'train') == [texts[0], texts[2]]
  config.data.filters.decontaminate.action = 'report'
  assert data.load_documents(config.data, 'train') == texts
  details = filters.apply(config.data, texts).report['steps'][0]['details']
  assert details['contaminated'] == 1 and details['eval_documents'] == 1
  assert details['eval_ngram_share_in_train'] == 1.0


def test_decontaminate_compares_with_the_validation_split_and_config_evals(tmp_path):
  task = tmp_path / 'task.jsonl'
  task.write_text(json.dumps({'text': stdlib_text('bisect.py')}) + '\n')
  config = make_config(source='text', path=str(tmp_path / 'docs'), tokenizer='bytes')
  (tmp_path / 'docs').mkdir()
  (tmp_path / 'docs' / 'a.txt').write_text(stdlib_text('bisect.py') + stdlib_text('heapq.py'))
  config.evals.ppl = dict(type='perplexity', path=str(task))
  config.data.filters.steps = ('decontaminate',)
  assert filters.eval_files(config) == (str(task),)
  resolved = filters.with_eval_files(config)
  assert tuple(resolved.data.filters.decontaminate.files) == (str(task),)
  with pytest.raises(ValueError, match="'decontaminate' would drop all 1 documents"):
    data.load_documents(resolved.data, 'train')  # Its head holds all of the task's text.


# Quality rules.


def test_quality_code_rules_drop_long_lines_and_generated_files(tmp_path):
  good = stdlib_text('bisect.py')
  long_line = good + 'x = ' + '1 + ' * 400 + '1\n'
  generated = '# This file is automatically generated; do not edit.\n' + good
  symbols = ('#' * 80 + '\n') * 30
  texts = [good, long_line, generated, symbols]
  config = corpus_config(tmp_path, texts)
  config.data.filters.steps = ('quality',)
  assert data.load_documents(config.data, 'train') == [good]
  details = filters.apply(config.data, texts).report['steps'][0]['details']
  assert details == {'autogenerated_markers': 1, 'max_line_length': 1,
                     'min_alphanum_fraction': 1, 'rules': 'code'}


def test_quality_prose_rules_keep_prose_and_drop_repetition_and_short_text(tmp_path):
  repeated = 'The sale is on and the prices are low today.\n' * 40
  texts = [ZEN, repeated, 'Too short to be a document.', ZEN.replace(' ', ' ... # ')]
  config = corpus_config(tmp_path, texts)
  config.data.filters.steps = ('quality',)
  config.data.filters.quality.rules = 'prose'
  assert data.load_documents(config.data, 'train') == [ZEN]
  details = filters.apply(config.data, texts).report['steps'][0]['details']
  assert details == {'max_duplicate_lines': 1, 'max_symbol_word_ratio': 1, 'min_words': 1,
                     'rules': 'prose'}


# The pipeline: filters where documents are read, and exact resume.


def dirty_corpus(tmp_path, streaming, val_fraction=0.0):
  """Short documents with duplicates and an e-mail address; the config cleans them."""
  texts = [f'doc {i}: ' + 'xyz'[i % 3] * (3 + i % 11) for i in range(24)]
  texts += texts[:6]  # Exact duplicates,
  texts.append('someone@corp-mail.net is where to reach me, write there')  # and PII.
  config = corpus_config(tmp_path, texts, streaming=streaming, read_threads=2, shuffle_window=8)
  config.data.filters.steps = ('exact_dedup', 'pii')
  config.data.val_fraction = val_fraction
  return config, texts[:24] + ['<EMAIL> is where to reach me, write there']


@pytest.mark.parametrize('streaming', [False, True])
def test_pipeline_reads_the_cleaned_documents_and_resumes_exactly(tmp_path, streaming):
  config, cleaned = dirty_corpus(tmp_path, streaming)
  tokenizer = tokenizers.ByteTokenizer()
  assert data.load_documents(config.data, 'train') == cleaned
  if streaming:  # The first epoch's rows, in packed order, hold the cleaned documents.
    config.data.shuffle_window = 0
    iterator = data.make_train_iterator(config, tokenizer, 0, 1)
    stream = np.concatenate([np.concatenate([b['inputs'], b['targets'][:, -1:]], axis=1).ravel()
                             for b in [next(iterator) for _ in range(20)]])
    pieces = np.split(stream, np.flatnonzero(stream == tokenizer.eos_id) + 1)
    documents = [tokenizer.decode(piece[:-1]) for piece in pieces]
    assert sorted(documents[:len(cleaned)]) == sorted(cleaned)
    config.data.shuffle_window = 8
  else:
    np.testing.assert_array_equal(pipeline._tokenize_split(config.data, 'train', tokenizer),
                                  data.tokenize_documents(cleaned, tokenizer))
  iterator = data.make_train_iterator(config, tokenizer, 1, 2)
  for _ in range(7):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(30)]  # Crosses epoch boundaries.
  resumed = data.make_train_iterator(config, tokenizer, 1, 2)
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(30)]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_training_with_filters_resumes_exactly_and_writes_the_report(tmp_path, monkeypatch):
  config, _ = dirty_corpus(tmp_path, streaming=True, val_fraction=0.25)
  config = tiny_config(None, total_steps=8, checkpoint_every_steps=100, seq_len=16,
                       **{'model.max_seq_len': 16, 'data': config.data})
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  interrupted = str(tmp_path / 'interrupted')
  monkeypatch.setattr(train.PreemptionWatch, 'reached', lambda self, step: step == 3)
  train.train_and_evaluate(config, interrupted)
  monkeypatch.undo()
  train.train_and_evaluate(config, interrupted)
  straight, resumed = read_metrics(tmp_path / 'straight'), read_metrics(interrupted)
  assert [r.get('train/loss') for r in straight] == [r.get('train/loss') for r in resumed]
  report = json.loads((tmp_path / 'straight' / filters.REPORT_FILE).read_text())
  assert report['documents'] == 31 and report['kept'] == 25
  assert [(s['name'], s['dropped'], s.get('changed', 0)) for s in report['steps']] == [
      ('exact_dedup', 6, 0), ('pii', 0, 1)]
  assert report['steps'][1]['details']['email'] == 1


# Bad input: one line, before any data is read.


@pytest.mark.parametrize('overrides, message', [
    ({'steps': ('exact_dedup', 'fuzzy_dedup')}, r"'fuzzy_dedup' is not a filter; expected"),
    ({'steps': ('pii', 'pii')}, 'names a filter twice'),
    ({'near_dedup.threshold': 1.5}, r'near_dedup.threshold=1.5: must be in \(0, 1\]'),
    ({'near_dedup.ngram': 0}, 'near_dedup.ngram=0 must be >= 1'),
    ({'steps': ('near_dedup',), 'near_dedup.threshold': 0.999},
     'near_dedup.threshold=0.999 with num_perm=256: datasketch cannot band it'),
    ({'decontaminate.threshold': 0.0}, r'threshold=0.0 in \(0, 1\]'),
    ({'decontaminate.tokens': 'bpe'}, "tokens='bpe' must be one of"),
    ({'quality.min_alpha_words': 2.0}, r'quality.min_alpha_words=2.0: must be in \[0, 1\]'),
    ({'quality.rules': 'html'}, "quality.rules='html': expected one of"),
    ({'quality.max_top_ngram_chars': (0.2,)}, 'must be 3 fractions'),
    ({'pii.allow': ('[unclosed',)}, r"'\[unclosed' is not a regex"),
    ({'steps': ('decontaminate',), 'decontaminate.files': ('/no/such/eval.jsonl',)},
     r'cannot read /no/such/eval.jsonl'),
    ({'steps': ('decontaminate',), 'decontaminate.validation': False},
     'nothing to compare with'),
])
def test_bad_filter_config_is_a_one_line_error_before_any_data_is_read(
    overrides, message, monkeypatch):
  monkeypatch.setitem(sources.SOURCES, 'stdlib', lambda *a: pytest.fail('read data'))
  config = make_config()
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    target = config.data.filters
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
    config_lib.validate(config)
  assert '\n' not in str(error.value)


def test_an_unreadable_config_evals_task_file_is_an_error_before_data(tmp_path, monkeypatch):
  monkeypatch.setitem(sources.SOURCES, 'stdlib', lambda *a: pytest.fail('read data'))
  config = make_config()
  config.evals.arc = dict(type='multiple_choice', path=str(tmp_path / 'missing.jsonl'))
  config.data.filters.steps = ('decontaminate',)
  with pytest.raises(FileNotFoundError, match='cannot read .*missing.jsonl'):
    config_lib.validate(config)


def test_a_filter_that_drops_every_document_is_an_error_naming_it(tmp_path):
  config = corpus_config(tmp_path, [ZEN, ZEN + ' More.'])
  config.data.filters.steps = ('exact_dedup', 'quality')
  config.data.filters.quality.update(rules='prose', min_words=10_000)
  with pytest.raises(ValueError, match=r"'quality' would drop all 2 documents of data.source=text"):
    data.load_documents(config.data, 'train')


def test_filters_refuse_jsonl_task_records():
  config = make_config(source='jsonl', path='/tmp/x.jsonl')
  config.data.filters.steps = ('pii',)
  with pytest.raises(ValueError, match="data.source='jsonl' task records are not filtered"):
    config_lib.validate(config)


def test_prepare_corpus_writes_the_cleaned_split_as_jsonl_shards(tmp_path):
  sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / 'scripts'))
  import prepare_corpus  # pylint: disable=g-import-not-at-top
  config, cleaned = dirty_corpus(tmp_path, streaming=False)
  out = tmp_path / 'clean'
  report = prepare_corpus.prepare(config, str(out), shard_documents=10)
  shards = sorted(os.listdir(out))
  assert shards == [filters.REPORT_FILE] + [f'train-0000{i}-of-00003.jsonl' for i in range(3)]
  written = [json.loads(line)['text'] for name in shards[1:]
             for line in (out / name).read_text().splitlines()]
  assert written == cleaned
  assert json.loads((out / filters.REPORT_FILE).read_text()) == report
  with pytest.raises(FileExistsError, match='not empty'):
    prepare_corpus.prepare(config, str(out), shard_documents=10)
