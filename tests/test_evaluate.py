"""Evaluation: bits per byte, log-likelihood scoring, task files, evaluators in training, and
lepton-eval. References are computed here with numpy from plain forward passes."""
import json
import math
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import data, evals, evaluate, sharding, train
from lepton_jax.data import tokenizers
from lepton_jax.evals import cost, generation, language_model, scoring, tasks
from lepton_jax.model import ModelConfig, Transformer
from tests.conftest import read_metrics, tiny_config

REPO = pathlib.Path(__file__).parent.parent
BYTES = tokenizers.ByteTokenizer()


@pytest.fixture(scope='module')
def tiny():
  """(config, model, variables, mesh): a random byte-level model on all 8 devices."""
  config = tiny_config(**{'model.vocab_size': BYTES.vocab_size})
  model = Transformer(ModelConfig.from_config(config.model))
  variables = nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32)))
  return config, model, variables, sharding.make_mesh(config.mesh)


def log_probs(model, variables, tokens) -> np.ndarray:
  """[len(tokens) - 1]: log p(tokens[i + 1] | tokens[:i + 1]), from one unpadded forward pass."""
  logits_TV = np.asarray(model.apply(variables, jnp.asarray([tokens[:-1]]))[0], np.float64)
  peak_T = logits_TV.max(-1)
  log_z_T = np.log(np.exp(logits_TV - peak_T[:, None]).sum(-1)) + peak_T
  return logits_TV[np.arange(len(tokens) - 1), tokens[1:]] - log_z_T


def reference_loglikelihood(model, variables, context, continuation) -> float:
  row = (context + continuation)[-(model.cfg.max_seq_len + 1):]
  return float(log_probs(model, variables, row)[-len(continuation):].sum())


def write_jsonl(path: pathlib.Path, records) -> str:
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records))
  return str(path)


def test_bits_per_byte_by_hand(tiny, tmp_path):
  config, model, variables, mesh = tiny
  text = 'Grüße, ça va? ' * 3  # 42 characters, 51 UTF-8 bytes: ü, ß and ç take two each.
  assert len(text.encode('utf-8')) == 51
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('x' * 58 + text)
  config = tiny_config(**{'model.vocab_size': BYTES.vocab_size, 'data.path': str(corpus),
                          'data.val_fraction': 0.42, 'eval_batches': 1})
  assert data.load_documents(config.data, 'eval') == [text]
  with sharding.use_mesh(mesh, config.mesh.rules):
    metrics = language_model.LanguageModel(config, BYTES, model, mesh, config.mesh.rules)(variables)

  # The eval stream is the text's bytes then eos; every token after the first is a target.
  stream = list(text.encode('utf-8')) + [BYTES.eos_id]
  nats = -sum(log_probs(model, variables, stream[i:i + 33]).sum() for i in (0, 32))
  scored_bytes = 51 - 1  # All but the first byte; eos spells none.
  assert metrics['bits_per_byte'] == pytest.approx(nats / math.log(2) / scored_bytes, rel=1e-5)
  assert metrics['loss'] == pytest.approx(nats / len(stream[1:]), rel=1e-5)
  assert metrics['perplexity'] == pytest.approx(math.exp(metrics['loss']), rel=1e-6)


def test_scored_bytes_follow_the_tokenizer(tmp_path):
  """Under a SentencePiece vocabulary the scored targets spell the eval text's bytes (bar the
  unscored first token): bits per byte compares models with different tokenizers."""
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('def grüß(x):\n    return x + 1\n' * 40)
  config = tiny_config(**{'data.path': str(corpus), 'data.tokenizer': 'sentencepiece',
                          'data.vocab_size': 300, 'data.val_fraction': 0.1})
  spm = data.build_tokenizer(config.data, str(tmp_path / 'workdir'))
  (text,) = data.load_documents(config.data, 'eval')  # The last 124 characters, one batch.
  unscored = spm.decode(spm.encode(text)[:1])
  assert language_model.scored_bytes(data.make_eval_batches(config, spm, 0, 1), spm) == (
      len(text.encode()) - len(unscored.encode()))


def test_scorer_equals_plain_forward_passes(tiny):
  config, model, variables, mesh = tiny
  rng = np.random.default_rng(0)
  requests = [(list(rng.integers(0, 256, n)), list(rng.integers(0, 256, m)))
              for n, m in [(1, 1), (5, 3), (20, 12), (40, 5), (3, 30), (1, 2), (9, 9)]]
  scorer = scoring.Scorer(model, mesh, config.mesh.rules, batch_size=4)  # 2 calls, 3 lengths.
  with sharding.use_mesh(mesh, config.mesh.rules):
    scores = scorer.loglikelihoods(variables, requests)
  for (context, continuation), (logprob, greedy) in zip(requests, scores):
    assert logprob == pytest.approx(reference_loglikelihood(model, variables, context,
                                                            continuation), rel=1e-4, abs=1e-4)
    assert not greedy  # Random tokens are never all a random model's argmax.


def test_requests_of_many_lengths_compile_a_few_shapes(tiny):
  config, model, variables, mesh = tiny
  rng = np.random.default_rng(2)
  requests = [([BYTES.eos_id], list(rng.integers(0, 256, n))) for n in range(1, 60)]
  scorer = scoring.Scorer(model, mesh, config.mesh.rules, batch_size=8)
  compiled = scoring._row_scores._cache_size()  # pylint: disable=protected-access
  with sharding.use_mesh(mesh, config.mesh.rules):
    scorer.loglikelihoods(variables, requests)
  # 59 lengths, windows of up to 32 inputs: rows padded to 16 or 32, 8 rows a call.
  assert scoring._row_scores._cache_size() - compiled <= 2  # pylint: disable=protected-access


def test_long_continuations_are_scored_in_windows(tiny):
  """A continuation longer than the window: every token once, each window after the token
  before it, the last one after as many as fit (lm-eval's rolling windows)."""
  config, model, variables, mesh = tiny
  tokens = list(np.random.default_rng(1).integers(0, 256, 70))  # Windows of 32, 32 and 6.
  scorer = scoring.Scorer(model, mesh, config.mesh.rules, batch_size=8)
  with sharding.use_mesh(mesh, config.mesh.rules):
    ((logprob, _),) = scorer.loglikelihoods(variables, [([BYTES.eos_id], tokens)])
  full = [BYTES.eos_id] + tokens
  expected = (log_probs(model, variables, full[:33]).sum() +
              log_probs(model, variables, full[32:65]).sum() +
              log_probs(model, variables, full[38:71])[-6:].sum())
  assert logprob == pytest.approx(expected, rel=1e-4)


def test_encode_pair_moves_trailing_spaces_into_the_continuation():
  context, continuation = scoring.encode_pair(BYTES, 'Q: 2+2= ', '4')
  assert context == [BYTES.eos_id] + list(b'Q: 2+2=') and continuation == list(b' 4')


def test_multiple_choice_ranks_choices_by_log_likelihood(tiny, tmp_path):
  config, model, variables, mesh = tiny
  contexts = ['line 3: the quick brown', 'over the', 'jumps']
  choices = [[' fox', ' cat', ' dog'], [' lazy dog', ' sun'], ['!', ' over']]
  lls = [[reference_loglikelihood(model, variables, *scoring.encode_pair(BYTES, ctx, c))
          for c in cs] for ctx, cs in zip(contexts, choices)]
  # The first two label the model's favourite, the last its least favourite: acc is 2/3.
  labels = [int(np.argmax(lls[0])), int(np.argmax(lls[1])), int(np.argmin(lls[2]))]
  path = write_jsonl(tmp_path / 'mc.jsonl', [
      {'context': ctx, 'choices': cs, 'label': label}
      for ctx, cs, label in zip(contexts, choices, labels)])
  expected_norm = np.mean([np.argmax(np.array(ll) / [len(c) for c in cs]) == label
                           for ll, cs, label in zip(lls, choices, labels)])
  config = tiny_config(tmp_path, **{'model.vocab_size': BYTES.vocab_size})
  config.evals.mc = dict(type='multiple_choice', path=path)
  with sharding.use_mesh(mesh, config.mesh.rules):
    metrics = evals.run(evals.build(config, model, BYTES, mesh, config.mesh.rules)[1:], variables)
  assert metrics == {'eval/mc/acc': pytest.approx(2 / 3), 'eval/mc/acc_norm': expected_norm}


def test_cloze_and_perplexity_tasks(tiny, tmp_path):
  config, model, variables, mesh = tiny
  cloze = [{'context': 'the quick', 'continuation': ' brown fox'},
           {'context': 'é', 'continuation': 'à'}]
  texts = ['x' * 40, 'héllo']
  scorer = scoring.Scorer(model, mesh, config.mesh.rules, batch_size=8)
  with sharding.use_mesh(mesh, config.mesh.rules):
    cloze_metrics = tasks.cloze(scorer, BYTES, variables, cloze)
    ppl_metrics = tasks.perplexity(scorer, BYTES, variables, [{'text': t} for t in texts])
  cloze_nats = -sum(reference_loglikelihood(
      model, variables, *scoring.encode_pair(BYTES, r['context'], r['continuation']))
                    for r in cloze)
  assert cloze_metrics['loss'] == pytest.approx(cloze_nats / (10 + 2), rel=1e-5)
  assert cloze_metrics['bits_per_byte'] == pytest.approx(cloze_nats / math.log(2) / 12, rel=1e-5)
  assert cloze_metrics['acc'] == 0.0
  doc = [BYTES.eos_id] + list(b'x' * 40)  # Windows: 32 tokens after eos, then 8 after 25.
  ppl_nats = -(log_probs(model, variables, doc[:33]).sum() +
               log_probs(model, variables, doc[8:41])[-8:].sum() +
               log_probs(model, variables, [BYTES.eos_id] + list('héllo'.encode())).sum())
  assert ppl_metrics['bits_per_byte'] == pytest.approx(ppl_nats / math.log(2) / (40 + 6), rel=1e-5)
  assert ppl_metrics['loss'] == pytest.approx(ppl_nats / 46, rel=1e-5)


def greedy_reference(model, variables, prompt: list[int], steps: int) -> list[int]:
  tokens = list(prompt)
  for _ in range(steps):
    tokens.append(int(jnp.argmax(model.apply(variables, jnp.asarray([tokens]))[0, -1])))
  return tokens[len(prompt):]


def test_generation_exact_match_against_greedy_decoding(tiny, tmp_path):
  config, model, variables, mesh = tiny
  prompts = ['line 1', 'the lazy dog']
  expected = [generation.cut(BYTES.decode(greedy_reference(
      model, variables, [BYTES.eos_id] + list(p.encode()), 6)), ['\n']) for p in prompts]
  path = write_jsonl(tmp_path / 'gen.jsonl', [{'prompt': prompts[0], 'target': expected[0]},
                                              {'prompt': prompts[1], 'target': 'not that'}])
  completer = generation.Completer(model, BYTES, batch_size=2, max_new_tokens=6)
  with sharding.use_mesh(mesh, config.mesh.rules):
    assert completer(variables, prompts) == expected
    metrics = tasks.exact_match(completer, variables, tasks.read_records(path, 'generation'))
  assert metrics == {'exact_match': 0.5}


@pytest.mark.parametrize('kind,lines,message', [
    ('multiple_choice', ['{"context": "a", "choices": ["b"], "label": 0}', '{"context": "a",'],
     r'mc.jsonl line 2: not JSON'),
    ('multiple_choice', ['', '{"context": "a", "choices": [], "label": 0}'],
     r"line 2: the choice list 'choices' is empty"),
    ('multiple_choice', ['{"context": "a", "choices": ["b", "c"], "label": 2}'],
     r'line 1: label 2 is out of range for 2 choices \(0 to 1\)'),
    ('multiple_choice', ['{"context": "a", "choices": ["b"], "label": true}'],
     r"line 1: field 'label' must be a int, not bool"),
    ('cloze', ['{"context": "a"}'], r"line 1: missing field 'continuation'"),
    ('perplexity', ['{"text": ""}'], r"line 1: field 'text' is empty"),
    ('generation', [], r'mc.jsonl holds no records'),
])
def test_malformed_task_files_name_the_line(tmp_path, kind, lines, message):
  path = write_jsonl(tmp_path / 'mc.jsonl', lines)
  with pytest.raises(ValueError, match=message):
    tasks.read_records(path, kind)


@pytest.mark.parametrize('spec,message', [
    (dict(type='mmlu'), r"config.evals.bad.type='mmlu': expected one of \('lm', "),
    (dict(type='cloze'), r'config.evals.bad.path is required for type'),
    (dict(type='lm', path='x'), r"config.evals.bad.path: not an option of type 'lm'"),
    (dict(type='lm', every=0), r'config.evals.bad.every=0: must be a positive integer'),
])
def test_bad_evaluator_specs_are_one_line_errors(spec, message):
  with pytest.raises(ValueError, match=message):
    evals.evaluators.check_spec('bad', spec)


def test_humaneval_is_bundled():
  problems = tasks.humaneval_problems()
  assert len(problems) == 164
  record = tasks.first_line_record(problems[0])
  assert record['prompt'] == problems[0]['prompt']
  assert record['target'] == '    for idx, elem in enumerate(numbers):'


def test_param_counts_by_dtype():
  params = {'a': jnp.zeros((3, 4), jnp.float32), 'b': {'c': jnp.zeros((5,), jnp.bfloat16)}}
  assert cost.param_counts(params) == {'params': 17, 'param_bytes': 58,
                                       'param_bytes/bfloat16': 10, 'param_bytes/float32': 48}


def test_evaluators_run_at_their_cadence_in_training(tmp_path):
  mc = write_jsonl(tmp_path / 'mc.jsonl', [{'context': 'line 3: the',
                                            'choices': [' quick', ' slow'], 'label': 0}])
  config = tiny_config(tmp_path, total_steps=12, log_every_steps=4, eval_every_steps=6)
  config.evals.mc = dict(type='multiple_choice', path=mc, every=4)
  config.evals.heldout = dict(type='lm', data=dict(val_fraction=0.2), batches=1)
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir))
  records = {r['step']: r for r in read_metrics(workdir)}
  assert [s for s, r in records.items() if 'eval/mc/acc' in r] == [4, 8, 12]
  assert [s for s, r in records.items() if 'eval/heldout/bits_per_byte' in r] == [6, 12]
  assert [s for s, r in records.items() if 'eval/loss' in r] == [6, 12]
  assert {'eval/loss', 'eval/perplexity', 'eval/accuracy',
          'eval/bits_per_byte'} <= records[12].keys()
  assert records[12]['eval/heldout/loss'] != records[12]['eval/loss']  # Other data.


def test_a_bad_task_file_stops_training_before_the_first_step(tmp_path):
  config = tiny_config(tmp_path, total_steps=4)
  bad_label = '{"context": "a", "choices": ["b"], "label": 3}'
  config.evals.mc = dict(type='multiple_choice',
                         path=write_jsonl(tmp_path / 'mc.jsonl', [bad_label]))
  with pytest.raises(ValueError, match='mc.jsonl line 1: label 3 is out of range'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'metrics.jsonl').exists()  # Not one step was taken.


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny run's (config file, workdir, its last logged metrics)."""
  tmp_path = tmp_path_factory.mktemp('run')
  config = tiny_config(tmp_path, total_steps=10)
  workdir = tmp_path / 'workdir'
  train.train_and_evaluate(config, str(workdir))
  config_file = tmp_path / 'run_config.py'
  config_file.write_text('import ml_collections\n\n\ndef get_config():\n'
                         f'  return ml_collections.ConfigDict({config.to_dict()!r})\n')
  return config_file, workdir, read_metrics(workdir)[-1]


def lepton_eval(*args):
  return subprocess.run([sys.executable, '-m', 'lepton_jax.evaluate', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_lepton_eval_reports_what_training_logged(trained, tmp_path):
  config_file, workdir, logged = trained
  mc = write_jsonl(tmp_path / 'arc.jsonl', [{'context': 'line', 'choices': [' 1', ' 2'],
                                             'label': 0}])
  out = tmp_path / 'results.json'
  result = lepton_eval(f'--config={config_file}', f'--workdir={workdir}', f'--out={out}',
                       f'--tasks=multiple_choice:{mc},humaneval')
  assert result.returncode == 0, result.stderr
  metrics = json.loads(out.read_text())['metrics']
  assert metrics['eval/loss'] == pytest.approx(logged['eval/loss'], rel=1e-5)
  assert metrics['eval/bits_per_byte'] == pytest.approx(logged['eval/bits_per_byte'], rel=1e-5)
  assert {'eval/arc/acc', 'eval/humaneval/loss', 'eval/humaneval/exact_match', 'cost/params',
          'cost/param_bytes/float32', 'cost/forward_tokens_per_sec',
          'cost/eval_step_peak_bytes'} <= metrics.keys()
  assert metrics['cost/params'] == metrics['cost/param_bytes/float32'] // 4
  assert '| metric | value |' in result.stdout
  assert f"| eval/loss | {metrics['eval/loss']:.4f} |" in result.stdout


@pytest.mark.parametrize('args,message', [
    (['--workdir={empty}'], r'lepton-eval: error: \S+ holds no checkpoints'),
    (['--workdir={workdir}', '--tasks=multiple_choice:{bad}'],
     r"lepton-eval: error: \S+bad.jsonl line 2: the choice list 'choices' is empty"),
    (['--workdir={workdir}', '--tasks=mmlu:{bad}'], r"lepton-eval: error: --tasks entry 'mmlu:"),
])
def test_lepton_eval_errors_are_one_line(trained, tmp_path, args, message):
  config_file, workdir, _ = trained
  bad = write_jsonl(tmp_path / 'bad.jsonl', ['{"context": "a", "choices": ["b"], "label": 0}',
                                             '{"context": "a", "choices": [], "label": 0}'])
  args = [a.format(empty=tmp_path, workdir=workdir, bad=bad) for a in args]
  result = lepton_eval(f'--config={config_file}', '--nocost', *args)
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert re.fullmatch(message + '.*', last), result.stderr


def test_a_hugging_face_model_scores_as_transformers(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from tests.conftest import save_tiny_hf_llama  # pylint: disable=g-import-not-at-top
  hf_dir = tmp_path / 'hf'
  save_tiny_hf_llama(hf_dir)
  text = 'line 7: the quick brown fox jumps over the lazy dog 0.\n'
  path = write_jsonl(tmp_path / 'ppl.jsonl', [{'text': text}])
  config = tiny_config(tmp_path)
  model, variables, tokenizer = evaluate.load(config, hf_dir=str(hf_dir))
  metrics = evaluate.evaluate(config, model, variables, tokenizer,
                              {'ppl': {'type': 'perplexity', 'path': path}}, measure_cost=False)

  ids = [tokenizer.bos_id] + tokenizer.encode(text)  # A document starts after bos.
  assert len(ids) <= 32  # One window: the whole text after bos.
  reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
  with torch.no_grad():
    logits = reference(torch.tensor([ids])).logits[0, :-1].double()
  nats = -logits.log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
  assert metrics['eval/ppl/loss'] == pytest.approx(nats / (len(ids) - 1), rel=1e-4)
  assert metrics['eval/ppl/bits_per_byte'] == pytest.approx(nats / math.log(2) / len(text),
                                                            rel=1e-4)
  assert np.isfinite(metrics['eval/bits_per_byte'])
