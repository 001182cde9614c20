"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors) <-> lepton's LoRA.

PEFT keeps, for each adapted module `M` of the base (`M.weight` in the base checkpoint),
`base_model.model.M.lora_A.weight` [r, in], `...lora_B.weight` [out, r] and, with DoRA,
`...lora_magnitude_vector` [out]; its scale is lora_alpha / r (/ sqrt(r) with use_rslora). Lepton's
A [*in, r] and B [r, *out] are their transposes, reshaped like the kernel (the TensorMaps below).
GPT-2's packed `c_attn` adapter shares one A across q, k and v: it loads (each of lepton's q, k,
v adapters gets a copy of A and its rows of B) but lepton's own q, k, v adapters do not save as
one.
"""
import json
import re

from etils import epath

from lepton_jax.hf.family import Family, TensorMap
from lepton_jax.model import ModelConfig
from lepton_jax.model.config import LORA_TARGETS, LoraConfig

CONFIG = 'adapter_config.json'
WEIGHTS = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'
_SHORTHAND = {path: name for name, path in LORA_TARGETS.items()}  # 'attn/query' -> 'q'
# adapter_config.json fields that change what the adapter computes, and the value lepton needs.
_MUST_BE = {'peft_type': ('LORA',), 'bias': ('none',), 'modules_to_save': (None, []),
            'rank_pattern': (None, {}), 'alpha_pattern': (None, {}),
            'layers_to_transform': (None, []), 'lora_bias': (None, False),
            'use_qalora': (None, False), 'target_parameters': (None, []),
            'trainable_token_indices': (None, {}, []), 'layer_replication': (None, [])}


def _module_name(tensor: TensorMap, layer: int) -> str:
  return tensor.hf_name.format(i=layer).removesuffix('.weight')


def _adaptable(hf_family: Family, cfg: ModelConfig) -> dict[str, TensorMap]:
  """Lepton Dense module path ('layers/attn/query', 'head') -> its kernel's TensorMap."""
  return {path.removesuffix('/kernel'): tensor for path, tensor in hf_family.tensors(cfg).items()
          if path.endswith('/kernel')}


def _peft_targets(target_modules, module_name: str) -> bool:
  """PEFT's rule: a string is a regex over whole module names, a list names module suffixes."""
  if isinstance(target_modules, str):
    return re.fullmatch(target_modules, module_name) is not None
  return any(module_name == t or module_name.endswith('.' + t) for t in target_modules)


def read_config(adapter_dir: str, hf_family: Family, cfg: ModelConfig) -> LoraConfig:
  """The LoraConfig of a PEFT adapter directory over a base whose config is `cfg`."""
  path = epath.Path(adapter_dir) / CONFIG
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: not a PEFT adapter directory')
  peft = json.loads(path.read_text())
  for field, allowed in _MUST_BE.items():
    if peft.get(field) not in allowed:
      raise ValueError(f'{path}: {field}={peft.get(field)!r} is not supported; lepton adapters need '
                       f'{allowed[0]!r}')
  modules = _adaptable(hf_family, cfg)
  per_layer = [{path for path, tensor in modules.items()
                if _peft_targets(peft['target_modules'], _module_name(tensor, layer))}
               for layer in range(cfg.num_layers)]
  if any(chosen != per_layer[0] for chosen in per_layer):
    raise ValueError(f'{path}: target_modules={peft["target_modules"]!r} adapts some layers and '
                     'not others; lepton adapts every layer alike')
  chosen = per_layer[0]
  if not chosen:
    raise ValueError(f'{path}: target_modules={peft["target_modules"]!r} names no module of this '
                     f'{hf_family.architecture}')
  targets = tuple(sorted(_SHORTHAND.get(p.removeprefix('layers/'), p) for p in chosen))
  return LoraConfig(targets=targets, rank=peft['r'], alpha=float(peft['lora_alpha']),
                    dropout=float(peft.get('lora_dropout') or 0.0),
                    rslora=bool(peft.get('use_rslora')), dora=bool(peft.get('use_dora')))


def tensors(hf_family: Family, cfg: ModelConfig) -> dict[str, TensorMap]:
  """TensorMaps of the adapter params `cfg.lora` gives the model, into PEFT's file."""
  result = {}
  for path, kernel in _adaptable(hf_family, cfg).items():
    name = PREFIX + kernel.hf_name.removesuffix('.weight')
    result[f'{path}/lora_a'] = TensorMap(name + '.lora_A.weight', transpose=True)
    result[f'{path}/lora_b'] = TensorMap(name + '.lora_B.weight', transpose=True,
                                         columns=kernel.columns)
    result[f'{path}/lora_magnitude'] = TensorMap(name + '.lora_magnitude_vector',
                                                 columns=kernel.columns)
  return result


def adapter_config(hf_family: Family, cfg: ModelConfig, adapted: list[str]) -> dict:
  """adapter_config.json for adapters on the lepton Dense modules `adapted` (module paths)."""
  if any(tensor.columns for tensor in _adaptable(hf_family, cfg).values()):
    raise ValueError(f'hf.save_adapter: {hf_family.architecture} packs q, k and v into one '
                     'tensor, whose PEFT adapter shares one A; lepton adapts them separately')
  modules = _adaptable(hf_family, cfg)
  target_modules = sorted({_module_name(modules[re.sub(r'^layers(_\d+)?', 'layers', path)], 0)
                           .rsplit('.', 1)[-1] for path in adapted})
  lora = cfg.lora
  return dict(
      peft_type='LORA', task_type='CAUSAL_LM', r=lora.rank, lora_alpha=lora.alpha,
      lora_dropout=lora.dropout, use_rslora=lora.rslora, use_dora=lora.dora,
      target_modules=target_modules, bias='none', fan_in_fan_out=False, modules_to_save=None,
      base_model_name_or_path=None, inference_mode=True, init_lora_weights=True)
