"""interpret's hook points against transformers itself: the attention patterns
(`output_attentions`, eager attention) and hidden states (`output_hidden_states`) of tiny random
models of every family hf.load reads, built locally (nothing downloads)."""
import numpy as np
import pytest

from lepton_jax import hf, interpret
from tests.conftest import HF_VOCAB, TINY_HF_MODELS, save_tiny_hf_models

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

T = 40  # Beyond Mistral's window (5) and Llama 3.1's original_max_position_embeddings (16).
TOKENS = np.random.default_rng(0).integers(0, HF_VOCAB, (2, T))


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  return save_tiny_hf_models(tmp_path_factory.mktemp('hf'))


@pytest.mark.parametrize('name, scan', [(name, False) for name in TINY_HF_MODELS] +
                         [('llama', True)])
def test_patterns_and_hidden_states_equal_transformers(hf_dirs, name, scan):
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dirs[name], attn_implementation='eager').eval()
  with torch.no_grad():
    out = reference(torch.tensor(TOKENS), output_attentions=True, output_hidden_states=True)
  model, variables = hf.load(str(hf_dirs[name]), scan_layers=scan)
  _, cache = interpret.run_with_cache(model, variables, TOKENS)

  num_layers = model.cfg.num_layers
  assert len(out.attentions) == num_layers and len(out.hidden_states) == num_layers + 1
  for i, attentions_BNTS in enumerate(out.attentions):
    np.testing.assert_allclose(cache[f'blocks.{i}.attn.hook_pattern'], attentions_BNTS.numpy(),
                               atol=1e-5, err_msg=f'layer {i}')
  # hidden_states: the embeddings, each block's output but the last, the final norm's output.
  ours = ([cache['blocks.0.hook_resid_pre']] +
          [cache[f'blocks.{i}.hook_resid_post'] for i in range(num_layers - 1)] +
          [cache['ln_final.hook_normalized']])
  for i, (hidden_BTD, reference_BTD) in enumerate(zip(ours, out.hidden_states)):
    np.testing.assert_allclose(hidden_BTD, reference_BTD.numpy(), atol=1e-5,
                               err_msg=f'hidden state {i}')
  np.testing.assert_allclose(cache[f'blocks.{num_layers - 1}.hook_resid_post'] -
                             cache[f'blocks.{num_layers - 1}.hook_resid_pre'],
                             cache[f'blocks.{num_layers - 1}.hook_attn_out'] +
                             cache[f'blocks.{num_layers - 1}.hook_mlp_out'], atol=1e-5)
  np.testing.assert_allclose(cache['unembed.hook_out'], out.logits.numpy(), atol=1e-4)
