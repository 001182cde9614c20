"""The classify head against transformers' *ForSequenceClassification: tiny random models of each
family built locally, loaded by lepton (right-padded batches included) and written back."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import hf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB, PAD, NUM_LABELS = 96, 0, 3
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
               max_position_embeddings=64, num_labels=NUM_LABELS, pad_token_id=PAD,
               rope_parameters={'rope_type': 'default', 'rope_theta': 5000.0})
CONFIGS = {
    'llama': lambda: transformers.LlamaConfig(**DECODER),
    'mistral': lambda: transformers.MistralConfig(**DECODER, sliding_window=5),
    'qwen2': lambda: transformers.Qwen2Config(**DECODER),
    'gpt2': lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                            n_positions=64, layer_norm_epsilon=1e-4,
                                            num_labels=NUM_LABELS, pad_token_id=PAD),
}
LENGTHS = (12, 7, 1)  # Real tokens per row; the rest is right padding.


def padded_tokens(lengths=LENGTHS, T=12) -> np.ndarray:
  tokens = np.random.default_rng(0).integers(1, VOCAB, (len(lengths), T))  # No pad among them.
  for row, length in enumerate(lengths):
    tokens[row, length:] = PAD
  return tokens


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  torch.manual_seed(0)
  dirs = {}
  for name, make_config in CONFIGS.items():
    model = transformers.AutoModelForSequenceClassification.from_config(make_config()).eval()
    with torch.no_grad():  # Norm weights away from 1, so a mapping that drops one cannot pass.
      for param_name, param in model.named_parameters():
        if ('norm' in param_name or 'ln_' in param_name) and param_name.endswith('weight'):
          param.copy_(1 + 0.2 * torch.randn_like(param))
    dirs[name] = tmp_path_factory.mktemp(name)
    model.save_pretrained(dirs[name])
  return dirs


def hf_logits(path, tokens) -> np.ndarray:
  model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.mark.parametrize('name', list(CONFIGS))
def test_a_classifier_loads_and_saves_with_the_logits_of_transformers(hf_dirs, tmp_path, name):
  tokens = padded_tokens()
  reference = hf_logits(hf_dirs[name], tokens)
  assert reference.shape == (3, NUM_LABELS)
  model, variables = hf.load(str(hf_dirs[name]))
  assert model.cfg.head == 'classify' and model.cfg.pad_id == PAD
  assert 'head' not in variables['params'] and variables['params']['score']['kernel'].shape == (
      32, NUM_LABELS)
  logits = np.asarray(model.apply(variables, jnp.asarray(tokens)))
  assert logits.dtype == np.float32
  np.testing.assert_allclose(logits, reference, atol=1e-4)
  # Each row alone, unpadded: right padding changes nothing, and left padding neither.
  for row, length in enumerate(LENGTHS):
    alone = np.asarray(model.apply(variables, jnp.asarray(tokens[row:row + 1, :length])))
    np.testing.assert_allclose(alone[0], logits[row], atol=1e-5)
  left = np.stack([np.roll(row, len(row) - length) for row, length in zip(tokens, LENGTHS)])
  np.testing.assert_allclose(model.apply(variables, jnp.asarray(left)), reference, atol=1e-4)

  hf.save(model, variables, str(tmp_path / 'export'), labels=['neg', 'neutral', 'pos'])
  saved = json.loads((tmp_path / 'export' / 'config.json').read_text())
  assert saved['architectures'][0].endswith('ForSequenceClassification')
  assert saved['id2label'] == {'0': 'neg', '1': 'neutral', '2': 'pos'}
  np.testing.assert_allclose(hf_logits(tmp_path / 'export', tokens), reference, atol=1e-4)


def test_a_classifier_without_a_pad_id_is_refused(hf_dirs, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(hf_dirs['llama'], tmp_path / 'llama')
  config = json.loads((tmp_path / 'llama' / 'config.json').read_text())
  config['pad_token_id'] = None
  (tmp_path / 'llama' / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r'config.json field pad_token_id=None: a classifier pools'):
    hf.load(str(tmp_path / 'llama'))
