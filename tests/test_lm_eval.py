"""The `lepton` model of lm-evaluation-harness, fully offline: task YAMLs read local JSONL, and
lm-eval's results equal lepton's own evaluators on the same records."""
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

# Read by `datasets` when it is imported: never reach the hub, cache prepared files in /tmp.
os.environ['HF_DATASETS_OFFLINE'] = '1'
os.environ.setdefault('HF_DATASETS_CACHE',
                      os.path.join(tempfile.gettempdir(), 'lepton_jax_test_hf_datasets'))
lm_eval = pytest.importorskip('lm_eval')
from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lepton_jax import evaluate, sharding, train  # pylint: disable=g-import-not-at-top
from lepton_jax.evals import generation, harness, scoring
from tests.conftest import tiny_config

REPO = pathlib.Path(__file__).parent.parent
MC = [{'context': 'line 3: the quick brown', 'choices': [' fox', ' cat', ' dog'], 'label': 0},
      {'context': 'line 5: the quick brown fox jumps over the', 'choices': [' lazy', ' x'],
       'label': 1},
      {'context': 'line 6: the ', 'choices': ['quick', 'slow brown'], 'label': 0}]
TEXTS = [{'text': 'line 1: the quick brown fox jumps over the lazy dog 1.\n' * 2},
         {'text': 'héllo wörld'}]
PROMPTS = [{'prompt': 'line 3: the quick', 'target': ' brown fox'},
           {'prompt': 'line 4:', 'target': ' the quick'}]

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
{body}"""
BODIES = {
    'lepton_mc': ('mc.jsonl', MC, """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""),
    'lepton_ppl': ('ppl.jsonl', TEXTS, """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: bits_per_byte
"""),
    'lepton_gen': ('gen.jsonl', PROMPTS, """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""),
}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(config, workdir, task directory): a tiny trained run and the three tasks' YAML and JSONL."""
  tmp_path = tmp_path_factory.mktemp('lm_eval')
  config = tiny_config(tmp_path, total_steps=30)
  workdir = str(tmp_path / 'workdir')
  train.train_and_evaluate(config, workdir)
  tasks = tmp_path / 'tasks'
  tasks.mkdir()
  for name, (file, records, body) in BODIES.items():
    (tasks / file).write_text(''.join(json.dumps(r) + '\n' for r in records))
    (tasks / f'{name}.yaml').write_text(YAML.format(name=name, path=tasks / file, body=body))
  return config, workdir, tasks


@pytest.mark.parametrize('length,max_len', [(1, 4), (4, 4), (5, 4), (9, 4), (70, 32), (3, 1)])
def test_windows_are_lm_evals_rolling_windows(length, max_len):
  tokens = list(range(100, 100 + length))
  expected = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, max_len, 1)]
  got = [(row[:len(row) - scored], row[len(row) - scored:])
         for row, scored in scoring.windows(([7], tokens), max_len)]
  assert got == [(list(a), list(b)) for a, b in expected]


def test_lm_eval_scores_as_lepton_does(run):
  config, workdir, tasks = run
  model = harness.LeptonLM(config=config, workdir=workdir, batch_size=8)
  results = lm_eval.simple_evaluate(
      model=model, tasks=list(BODIES), bootstrap_iters=0, log_samples=True,
      task_manager=TaskManager(include_path=str(tasks), include_defaults=False))

  specs = {name: {'type': kind, 'path': str(tasks / BODIES[name][0])}
           for name, kind in [('lepton_mc', 'multiple_choice'), ('lepton_ppl', 'perplexity'),
                              ('lepton_gen', 'generation')]}
  specs['lepton_gen']['max_new_tokens'] = 8
  own = evaluate.evaluate(config, model.model, model.variables, model.tokenizer, specs,
                          measure_cost=False)
  got = results['results']
  assert got['lepton_mc']['acc,none'] == pytest.approx(own['eval/lepton_mc/acc'])
  assert got['lepton_mc']['acc_norm,none'] == pytest.approx(own['eval/lepton_mc/acc_norm'])
  assert got['lepton_ppl']['bits_per_byte,none'] == pytest.approx(
      own['eval/lepton_ppl/bits_per_byte'], rel=1e-6)

  # Per request: lm-eval's log-likelihoods and completions are lepton's of the same text.
  choice_pairs = [scoring.encode_pair(model.tokenizer, r['context'], c)
                  for r in MC for c in r['choices']]
  mesh = sharding.make_mesh(config.mesh)
  with sharding.use_mesh(mesh, config.mesh.rules):
    expected = scoring.Scorer(model.model, mesh, config.mesh.rules, 8).loglikelihoods(
        model.variables, choice_pairs)
    completions = generation.Completer(model.model, model.tokenizer, 8, 8, ('\n',))(
        model.variables, [p['prompt'] for p in PROMPTS])
  samples = sorted(results['samples']['lepton_mc'], key=lambda s: s['doc_id'])
  assert [tuple(resp[0]) for s in samples for resp in s['resps']] == expected
  generated = sorted(results['samples']['lepton_gen'], key=lambda s: s['doc_id'])
  assert [s['resps'][0][0] for s in generated] == completions
  assert got['lepton_gen']['exact_match,none'] == own['eval/lepton_gen/exact_match']


def test_lepton_lm_eval_command(run, tmp_path):
  config, workdir, tasks = run
  config_file = tmp_path / 'run_config.py'
  config_file.write_text('import ml_collections\n\n\ndef get_config():\n'
                         f'  return ml_collections.ConfigDict({config.to_dict()!r})\n')
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, '-m', 'lepton_jax.evals.harness', 'run', '--model', 'lepton',
       '--model_args', f'config={config_file},workdir={workdir}', '--tasks', 'lepton_mc',
       '--include_path', str(tasks), '--output_path', str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, HF_DATASETS_OFFLINE='1'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert '|lepton_mc|' in result.stdout.replace(' ', '')
  (saved,) = out.glob('**/results_*.json')
  assert 'acc,none' in json.loads(saved.read_text())['results']['lepton_mc']
