"""AdaLoRA and prompt-tuning adapters in PEFT's format both ways, against peft itself (tiny models
built locally; the AdaLoRA adapter is trained by PEFT's own rank allocator, so it is pruned)."""
import json

import numpy as np
import pytest

from lepton_jax import adalora, generate, hf, lora
from tests.conftest import HF_VOCAB, save_tiny_hf_model

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

TOKENS = np.random.default_rng(0).integers(0, HF_VOCAB, (2, 20))


@pytest.fixture(scope='module')
def base_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('base')
  save_tiny_hf_model(directory, 'llama')
  return directory


def base_model(base_dir):
  return transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()


def peft_logits(model, virtual=0) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()[:, virtual:]


def lepton_logits(model, variables) -> np.ndarray:
  return np.asarray(model.apply(variables, TOKENS))


@pytest.fixture(scope='module')
def adalora_dir(base_dir, tmp_path_factory):
  """An AdaLoRA adapter trained and pruned by PEFT (12 steps, init_r 4 -> target_r 2)."""
  torch.manual_seed(1)
  model = peft.get_peft_model(base_model(base_dir), peft.AdaLoraConfig(
      task_type='CAUSAL_LM', init_r=4, target_r=2, lora_alpha=8, total_step=12, tinit=2,
      tfinal=3, deltaT=1, target_modules=['q_proj', 'v_proj', 'down_proj']))
  model.train()
  optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
  inputs = torch.tensor(TOKENS)
  for step in range(12):
    model(input_ids=inputs, labels=inputs).loss.backward()
    optimizer.step()
    model.base_model.update_and_allocate(step)
    optimizer.zero_grad()
  directory = tmp_path_factory.mktemp('adalora')
  model.save_pretrained(directory)
  return directory


def test_a_pruned_peft_adalora_adapter_loads_saves_and_merges(base_dir, adalora_dir, tmp_path):
  reference = peft_logits(peft.PeftModel.from_pretrained(base_model(base_dir), adalora_dir).eval())
  pattern = json.loads((adalora_dir / 'adapter_config.json').read_text())['rank_pattern']
  assert 0 < sum(map(sum, pattern.values())) < 4 * len(pattern)  # PEFT did prune.

  model, variables = hf.load(str(base_dir), adapter=str(adalora_dir))
  assert model.cfg.peft.method == 'adalora' and model.cfg.lora.rank == 4
  np.testing.assert_allclose(lepton_logits(model, variables), reference, atol=1e-4)
  ranks = adalora.ranks(variables['params'])
  assert ranks['layers_1/attn/value'] == [sum(pattern['model.layers.1.self_attn.v_proj.lora_E'])]

  hf.save_adapter(model, variables, str(tmp_path / 'saved'))
  saved = json.loads((tmp_path / 'saved' / 'adapter_config.json').read_text())
  assert saved['rank_pattern'] == pattern
  reloaded = peft.PeftModel.from_pretrained(base_model(base_dir), tmp_path / 'saved').eval()
  np.testing.assert_allclose(peft_logits(reloaded), reference, atol=1e-4)

  merged_model, merged = lora.merge(model, variables)
  hf.save(merged_model, merged, str(tmp_path / 'merged'))
  merged_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'merged').eval()
  np.testing.assert_allclose(peft_logits(merged_hf), reference, atol=1e-4)


def test_an_unpruned_adalora_adapter_round_trips(base_dir, tmp_path):
  torch.manual_seed(2)
  model = peft.get_peft_model(base_model(base_dir), peft.AdaLoraConfig(
      task_type='CAUSAL_LM', init_r=3, target_r=2, lora_alpha=6, total_step=10,
      init_lora_weights=False, target_modules=['k_proj', 'o_proj', 'up_proj'])).eval()
  model.save_pretrained(tmp_path / 'adapter')
  reference = peft_logits(model)
  lepton_model, variables = hf.load(str(base_dir), adapter=str(tmp_path / 'adapter'),
                                    scan_layers=True)
  np.testing.assert_allclose(lepton_logits(lepton_model, variables), reference, atol=1e-4)
  hf.save_adapter(lepton_model, variables, str(tmp_path / 'saved'))
  reloaded = peft.PeftModel.from_pretrained(base_model(base_dir), tmp_path / 'saved').eval()
  np.testing.assert_allclose(peft_logits(reloaded), reference, atol=1e-4)


@pytest.mark.parametrize('init', ['RANDOM', 'SAMPLE_VOCAB'])
def test_peft_prompt_tuning_loads_decodes_and_saves(base_dir, tmp_path, init):
  torch.manual_seed(3)
  model = peft.get_peft_model(base_model(base_dir), peft.PromptTuningConfig(
      task_type='CAUSAL_LM', num_virtual_tokens=7, prompt_tuning_init=init)).eval()
  with torch.no_grad():  # Off its init, so that a dropped prompt cannot pass.
    model.prompt_encoder['default'].embedding.weight.mul_(3.0)
  model.save_pretrained(tmp_path / 'adapter')
  reference = peft_logits(model, virtual=7)

  lepton_model, variables = hf.load(str(base_dir), adapter=str(tmp_path / 'adapter'))
  assert lepton_model.cfg.peft.virtual_tokens == 7
  np.testing.assert_allclose(lepton_logits(lepton_model, variables), reference, atol=1e-4)
  # The KV-cache decoder holds the virtual tokens too: its greedy tokens are the argmax of
  # PEFT's logits for the prompt, then for the prompt and each drawn token.
  new = generate.generate(lepton_model, variables, [TOKENS[0, :5].tolist()], max_new_tokens=4)[0]
  sequence = TOKENS[:1, :5]
  for token in new:
    with torch.no_grad():
      logits = model(torch.tensor(sequence)).logits.numpy()
    assert token == int(np.argmax(logits[0, -1]))
    sequence = np.concatenate([sequence, [[token]]], axis=1)

  hf.save_adapter(lepton_model, variables, str(tmp_path / 'saved'))
  reloaded = peft.PeftModel.from_pretrained(base_model(base_dir), tmp_path / 'saved').eval()
  np.testing.assert_allclose(peft_logits(reloaded, virtual=7), reference, atol=1e-4)
  with pytest.raises(ValueError, match=r"hf.save: a Hugging Face model has no place for "
                                       r"config.peft.method='prompt'"):
    hf.save(lepton_model, variables, str(tmp_path / 'export'))


def test_peft_methods_lepton_cannot_take_are_one_line_errors(base_dir, tmp_path):
  model = peft.get_peft_model(base_model(base_dir), peft.IA3Config(
      task_type='CAUSAL_LM', target_modules=['k_proj', 'down_proj'],
      feedforward_modules=['down_proj']))
  model.save_pretrained(tmp_path / 'ia3')
  with pytest.raises(ValueError, match=r"peft_type='IA3' is not supported; lepton reads LORA, "
                                       r'ADALORA and PROMPT_TUNING'):
    hf.load(str(base_dir), adapter=str(tmp_path / 'ia3'))
  prompt = peft.get_peft_model(base_model(base_dir), peft.PromptTuningConfig(
      task_type='CAUSAL_LM', num_virtual_tokens=60))
  prompt.save_pretrained(tmp_path / 'long')
  lepton_model, variables = hf.load(str(base_dir), adapter=str(tmp_path / 'long'))
  with pytest.raises(ValueError, match=r'after a prompt of 65 tokens \(60 of them virtual\) the '
                                       r'model has positions for 0 more'):
    generate.generate(lepton_model, variables, [[1, 2, 3, 4, 5]], max_new_tokens=1)
