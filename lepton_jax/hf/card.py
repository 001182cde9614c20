"""The README.md model card `hf.save` writes: what the model is and, from a run, how it trained."""
import json

import jax

from lepton_jax.hf import family
from lepton_jax.model import ModelConfig
from lepton_jax.model.config import ARCHITECTURE_FIELDS


def model_card(hf_family: family.Family, cfg: ModelConfig, params: dict, run: dict | None) -> str:
  count = sum(leaf.size for leaf in jax.tree.leaves(params))
  rows = '\n'.join(f'| {field} | {getattr(cfg, field)} |' for field in ARCHITECTURE_FIELDS)
  lines = [
      '---', 'library_name: transformers', 'tags: [lepton_jax]', '---', '',
      f'# {hf_family.architecture}', '',
      f'Exported by lepton_jax as a `{hf_family.model_type}` model: {count:,} parameters '
      f'({count / 1e6:.1f}M), weights in {jax.tree.leaves(params)[0].dtype}.', '',
      '```python', 'from transformers import AutoModelForCausalLM',
      'model = AutoModelForCausalLM.from_pretrained("PATH")', '```', '',
      '## Architecture', '', '| lepton model field | value |', '|---|---|', rows]
  if run:
    if run.get('metrics'):
      lines += ['', '## Last metrics of the run', '', '| metric | value |', '|---|---|']
      lines += [f'| {k} | {v:.6g} |' for k, v in sorted(run['metrics'].items())
                if isinstance(v, (int, float))]
    if run.get('config') is not None:
      lines += ['', '## Training config', '', '```json',
                json.dumps(json.loads(run['config'].to_json_best_effort()), indent=2), '```']
  return '\n'.join(lines) + '\n'
