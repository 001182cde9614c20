"""LoRA adapters in PEFT's format both ways, against peft itself (tiny models built locally)."""
import json

import numpy as np
import pytest

from lepton_jax import hf, lora
from tests.conftest import HF_VOCAB, save_tiny_hf_model

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

TOKENS = np.random.default_rng(0).integers(0, HF_VOCAB, (2, 20))
ADAPTERS = {  # init_lora_weights=False: random B, so a dropped adapter cannot pass.
    'qv': dict(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj']),
    'all_linear_rslora': dict(r=4, lora_alpha=16, target_modules='all-linear', use_rslora=True),
    'dora': dict(r=2, lora_alpha=4, target_modules=['q_proj', 'o_proj', 'down_proj'],
                 use_dora=True),
}


@pytest.fixture(scope='module')
def base_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('base')
  save_tiny_hf_model(directory, 'qwen2')
  return directory


def base_model(base_dir):
  return transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()


def peft_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


def make_adapter(base_dir, tmp_path, **fields):
  torch.manual_seed(1)
  model = peft.get_peft_model(base_model(base_dir), peft.LoraConfig(
      task_type='CAUSAL_LM', init_lora_weights=False, **fields))
  if fields.get('use_dora'):  # Move the magnitudes off their initial column norms too.
    with torch.no_grad():
      for name, param in model.named_parameters():
        if 'lora_magnitude' in name:
          param.mul_(1 + 0.1 * torch.randn_like(param))
  model.save_pretrained(tmp_path / 'adapter')
  return tmp_path / 'adapter', peft_logits(model.eval())


@pytest.mark.parametrize('name', list(ADAPTERS))
def test_peft_adapters_load_save_and_merge_with_equal_logits(base_dir, tmp_path, name):
  adapter_dir, reference = make_adapter(base_dir, tmp_path, **ADAPTERS[name])
  model, variables = hf.load(str(base_dir), adapter=str(adapter_dir))
  assert model.cfg.lora.rank == ADAPTERS[name]['r']
  np.testing.assert_allclose(np.asarray(model.apply(variables, TOKENS)), reference, atol=1e-4)

  hf.save_adapter(model, variables, str(tmp_path / 'saved'))
  reloaded = peft.PeftModel.from_pretrained(base_model(base_dir), tmp_path / 'saved').eval()
  np.testing.assert_allclose(peft_logits(reloaded), reference, atol=1e-4)

  merged_model, merged = lora.merge(model, variables)
  hf.save(merged_model, merged, str(tmp_path / 'merged'))
  merged_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'merged').eval()
  np.testing.assert_allclose(peft_logits(merged_hf), reference, atol=1e-4)


def test_gpt2_packed_qkv_adapter_loads_but_does_not_save(tmp_path):
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
      vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(tmp_path / 'b')
  torch.manual_seed(1)
  model = peft.get_peft_model(
      transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'b'),
      peft.LoraConfig(task_type='CAUSAL_LM', init_lora_weights=False, r=4, lora_alpha=8,
                      target_modules=['c_attn', 'c_fc'], fan_in_fan_out=True)).eval()
  model.save_pretrained(tmp_path / 'adapter')
  lepton_model, variables = hf.load(str(tmp_path / 'b'), adapter=str(tmp_path / 'adapter'))
  assert lepton_model.cfg.lora.targets == ('k', 'q', 'up', 'v')
  np.testing.assert_allclose(np.asarray(lepton_model.apply(variables, TOKENS)), peft_logits(model),
                             atol=1e-4)
  with pytest.raises(ValueError, match='packs q, k and v into one tensor'):
    hf.save_adapter(lepton_model, variables, str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('changes, message', [
    ({'bias': 'all'}, "bias='all' is not supported"),
    ({'rank_pattern': {'q_proj': 8}}, 'rank_pattern='),
    ({'layers_to_transform': [0]}, 'layers_to_transform=\\[0\\]'),
    ({'target_modules': ['model.layers.0.self_attn.q_proj']}, 'adapts some layers and not others'),
    ({'target_modules': ['nothing']}, 'names no module'),
])
def test_adapter_configs_lepton_cannot_express(base_dir, tmp_path, changes, message):
  adapter_dir, _ = make_adapter(base_dir, tmp_path, **ADAPTERS['qv'])
  config = json.loads((adapter_dir / 'adapter_config.json').read_text())
  config.update(changes)
  (adapter_dir / 'adapter_config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match=message):
    hf.load(str(base_dir), adapter=str(adapter_dir))


def test_saving_a_model_with_adapters_asks_to_merge_first(base_dir, tmp_path):
  adapter_dir, _ = make_adapter(base_dir, tmp_path, **ADAPTERS['qv'])
  model, variables = hf.load(str(base_dir), adapter=str(adapter_dir))
  with pytest.raises(ValueError, match=r'lora.merge\(model, variables\) first'):
    hf.save(model, variables, str(tmp_path / 'out'))
