"""A run that starts from a Hugging Face model (config.init_from), and its export back."""
import importlib
import json
import subprocess
import sys

import numpy as np
import pytest

from lepton_jax import pretrained, sample, train
from tests.conftest import TEXT

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
hf_tokenizers = pytest.importorskip('tokenizers')

BOS, EOS = '<s>', '</s>'


def save_tiny_llama_with_tokenizer(directory):
  """A tiny random Llama and a BPE tokenizer trained on TEXT, as a released model ships them."""
  tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = hf_tokenizers.decoders.ByteLevel()
  tokenizer.train_from_iterator([TEXT], hf_tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=[BOS, EOS], show_progress=False,
      initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS,
                                       eos_token=EOS).save_pretrained(directory)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
      eos_token_id=1, rope_parameters={'rope_type': 'default', 'rope_theta': 5000.0})
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('hf_llama')
  save_tiny_llama_with_tokenizer(directory)
  return directory


def finetune_config(hf_dir, tmp_path, **overrides):
  config = importlib.import_module('configs.finetune_hf').get_config(str(hf_dir))
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(TEXT)
  config.update(total_steps=2, batch_size=8, seq_len=32, log_every_steps=1, eval_every_steps=2,
                eval_batches=1, checkpoint_every_steps=2)
  config.data.update(source='text', path=str(corpus))
  config.sample.num_tokens = 0
  for key, value in overrides.items():
    *parents, last = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[last] = value
  return config


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
