"""A run that starts from a Hugging Face model (config.init_from), and its export back."""
import json
import subprocess
import sys

import numpy as np
import pytest

from lepton_jax import pretrained, sample, train
from tests.conftest import TEXT, finetune_config, save_tiny_hf_llama

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('tokenizers')

@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('hf_llama')
  save_tiny_hf_llama(directory)
  return directory


def hf_logits(path, tokens):
  model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def test_finetune_starts_from_the_weights_and_exports_back(hf_dir, tmp_path):
  # With a zero learning rate the run's weights stay the released ones exactly.
  config = finetune_config(hf_dir, tmp_path, **{'optimizer.learning_rate': 0.0})
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert saved['model']['d_model'] == 32 and saved['data']['tokenizer'] == 'hf'
  model, variables, tokenizer = sample.load(config, str(tmp_path / 'run'))
  assert tokenizer.bos_id == 0 and tokenizer.eos_id == 1
  tokens = np.array([tokenizer.encode(TEXT[:200])[:24]])
  np.testing.assert_allclose(np.asarray(model.apply(variables, tokens)),
                             hf_logits(hf_dir, tokens), atol=1e-4)

  # A second run starts from the first (workdir:DIR:STEP), trains, and exports with its tokenizer.
  second = finetune_config(hf_dir, tmp_path, init_from=f'workdir:{tmp_path / "run"}:2',
                           **{'optimizer.learning_rate': 1e-2})
  metrics = train.train_and_evaluate(second, str(tmp_path / 'second'))
  assert np.isfinite(metrics['eval/loss'])
  out = tmp_path / 'export'
  subprocess.run([sys.executable, 'scripts/export_hf.py', '--config=configs/finetune_hf.py:' +
                  str(hf_dir), f'--workdir={tmp_path / "second"}', f'--out={out}',
                  f'--config.init_from=workdir:{tmp_path / "run"}:2', '--config.seq_len=32',
                  f'--config.data.path={tmp_path / "corpus.txt"}', '--config.data.source=text'],
                 check=True, capture_output=True)
  model, variables, _ = sample.load(second, str(tmp_path / 'second'))
  np.testing.assert_allclose(hf_logits(out, tokens), np.asarray(model.apply(variables, tokens)),
                             atol=1e-4)
  assert not np.allclose(hf_logits(out, tokens), hf_logits(hf_dir, tokens), atol=1e-3)
  assert transformers.AutoTokenizer.from_pretrained(out).encode(
      TEXT[:200], add_special_tokens=False) == tokenizer.encode(TEXT[:200])
  card = (out / 'README.md').read_text()
  assert 'LlamaForCausalLM' in card and 'eval/loss' in card


def test_an_override_that_contradicts_the_checkpoint_names_both(hf_dir, tmp_path):
  config = finetune_config(hf_dir, tmp_path, **{'model.d_model': 64})
  with pytest.raises(ValueError, match=r"config.model.d_model=64 contradicts config.init_from="
                                       r"'hf:.*', whose model has d_model=32"):
    pretrained.resolve(config)


def test_how_the_model_runs_stays_the_configs(hf_dir, tmp_path):
  config = pretrained.resolve(finetune_config(hf_dir, tmp_path, **{'model.scan_layers': True,
                                                                   'model.remat': 'full'}))
  assert (config.model.scan_layers, config.model.remat, config.model.num_kv_heads) == (True,
                                                                                      'full', 2)


@pytest.mark.parametrize('init_from', ['hf', 'hf:', 'workdir', 'gs:/x', 'dir:/x'])
def test_a_malformed_init_from(init_from):
  with pytest.raises(ValueError, match='config.init_from='):
    pretrained.parse(init_from)
