"""Loading a trained run's checkpoint to sample from it: lepton_jax.sample.load and scripts/sample.py."""
import functools
import pathlib
import subprocess
import sys

import jax
import pytest

from lepton_jax import config_lib, data, sample, steps, train
from tests.conftest import read_metrics, tiny_config

REPO = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny run with checkpoints and evals at steps 10 and 20: (config, workdir)."""
  tmp_path = tmp_path_factory.mktemp('run')
  config = tiny_config(tmp_path, total_steps=20)
  workdir = str(tmp_path / 'workdir')
  train.train_and_evaluate(config, workdir)
  return config, workdir


def eval_loss(config, model, variables, tokenizer) -> float:
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model))
  sums = [eval_fn(variables, batch) for batch in data.make_eval_batches(config, tokenizer, 0, 1)]
  return sum(float(s['loss_sum']) for s in sums) / sum(float(s['tokens']) for s in sums)


@pytest.mark.parametrize('step', [None, 10])
def test_load_restores_the_params_the_run_evaluated(trained, step):
  config, workdir = trained
  model, variables, tokenizer = sample.load(config, workdir, step)
  logged = {r['step']: r['eval/loss'] for r in read_metrics(workdir) if 'eval/loss' in r}
  assert eval_loss(config, model, variables, tokenizer) == pytest.approx(logged[step or 20], rel=1e-5)


def test_loaded_model_continues_prompts_in_one_batch(trained):
  config, workdir = trained
  model, variables, tokenizer = sample.load(config, workdir)
  prompts = ['line 3', 'line 12: the', 'line 3']
  texts = sample.sample_texts(model, variables, tokenizer, prompts, num_tokens=20,
                              temperature=0.5, top_k=10, top_p=0.9, seed=0)
  for prompt, text in zip(prompts, texts):  # Bytes: a token per character; eos may end it early.
    assert text.startswith(prompt) and len(prompt) < len(text) <= len(prompt) + 20
  assert texts[0] != texts[2]  # The same prompt, sample 0 and sample 2 of the seed.
  greedy = sample.sample_texts(model, variables, tokenizer, prompts[:2], num_tokens=20)
  assert greedy == sample.sample_texts(model, variables, tokenizer, prompts[:2], num_tokens=20,
                                       seed=1)


def test_a_sample_that_cannot_fit_fails_before_training(tmp_path):
  config = tiny_config(tmp_path, **{'sample.prompt': 'line', 'sample.num_tokens': 29})
  with pytest.raises(ValueError, match=r"config.sample.prompt='line' with config.sample."
                     r'num_tokens=29: max_new_tokens=29 overflows the cache: after a prompt of 5 '
                     r'tokens the model has positions for 28 more \(max_seq_len=32\)'):
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert not list((tmp_path / 'workdir' / 'checkpoints').iterdir())  # No step was taken.
  assert not (tmp_path / 'workdir' / 'metrics.jsonl').exists()


@pytest.mark.parametrize('overrides, message', [
    ({'sample.num_tokens': 33}, r'config.sample.num_tokens=33: must be in \[0, '
     r'config.model.max_seq_len=32\]'),
    ({'sample.num_tokens': -1}, r'config.sample.num_tokens=-1'),
    ({'sample.top_p': 0.0}, r'config.sample.top_p=0.0: must be in \(0, 1\]'),
    ({'sample.temperature': -0.5}, r'config.sample.temperature=-0.5: must be >= 0'),
    ({'sample.min_p': -0.1}, r'config.sample.min_p=-0.1'),
    ({'sample.top_k': -1}, r'config.sample.top_k=-1'),
])
def test_sample_settings_are_validated(overrides, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(tiny_config(**overrides))


def test_load_names_a_missing_workdir_or_step(trained, tmp_path):
  config, workdir = trained
  with pytest.raises(FileNotFoundError, match=f'{tmp_path} holds no checkpoints'):
    sample.load(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()  # Nothing created where nothing was.
  with pytest.raises(FileNotFoundError, match=r'no checkpoint of step 15; it has steps \[10, 20\]'):
    sample.load(config, workdir, step=15)


def test_load_uses_the_runs_tokenizer_and_never_trains_another(tmp_path):
  spm = {'data.tokenizer': 'sentencepiece', 'data.vocab_size': 300}
  config = tiny_config(tmp_path, total_steps=2, **spm)
  workdir = tmp_path / 'workdir'
  train.train_and_evaluate(config, str(workdir))
  (trained_model,) = (workdir / 'tokenizer').iterdir()
  assert sample.load(config, str(workdir))[2].path == str(trained_model)

  other_data = tiny_config(tmp_path, total_steps=2, **{**spm, 'data.val_fraction': 0.2})
  with pytest.raises(FileNotFoundError, match=r'tokenizer has no SentencePiece model for these '
                     r'data settings \(spm_v300_\w+\.model\); give the data settings the run'):
    sample.load(other_data, str(workdir))
  assert list((workdir / 'tokenizer').iterdir()) == [trained_model]


def test_sample_script_prints_samples_and_one_line_errors(trained, tmp_path):
  config, workdir = trained
  config_file = tmp_path / 'run_config.py'  # The run's config as a file, as lepton-train takes.
  config_file.write_text('import ml_collections\n\n\ndef get_config():\n'
                         f'  return ml_collections.ConfigDict({config.to_dict()!r})\n')
  command = [sys.executable, 'scripts/sample.py', f'--config={config_file}',
             '--config.sample.prompt=line', '--config.sample.num_tokens=20', '--samples=2']
  result = subprocess.run([*command, f'--workdir={workdir}'], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count('--- sample ') == 2 and '\nline' in result.stdout

  empty = tmp_path / 'empty'
  missing = subprocess.run([*command, f'--workdir={empty}'], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
  assert missing.returncode != 0
  assert missing.stderr.strip().splitlines()[-1] == (
      f'sample: error: {empty} holds no checkpoints; train there first '
      f'(lepton-train --workdir={empty}).')
