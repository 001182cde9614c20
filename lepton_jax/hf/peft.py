"""PEFT adapters (adapter_config.json + adapter_model.safetensors) <-> lepton's: LoRA, AdaLoRA
and prompt tuning (config.peft.method 'lora', 'adalora', 'prompt').

PEFT keeps, for each adapted module `M` of the base (`M.weight` in the base checkpoint),
`base_model.model.M.lora_A.weight` [r, in], `...lora_B.weight` [out, r] and, with DoRA,
`...lora_magnitude_vector` [out]; its scale is lora_alpha / r (/ sqrt(r) with use_rslora). Lepton's
A [*in, r] and B [r, *out] are their transposes, reshaped like the kernel (the TensorMaps below).
GPT-2's packed `c_attn` adapter shares one A across q, k and v: it loads (each of lepton's q, k,
v adapters gets a copy of A and its rows of B) but lepton's own q, k, v adapters do not save as
one.

AdaLoRA's `lora_A` [r, in], `lora_E` [r, 1] and `lora_B` [out, r] (no `.weight`) are P, e and
Q; its scale alpha / r uses the initial rank `init_r`. A pruned adapter's file holds only the
kept rows, which `rank_pattern` (module name + '.lora_E' -> one bool per initial rank) places:
lepton keeps all init_r with zeros at the pruned singular values, and writes them back so.
Prompt tuning's `prompt_embeddings` [N, D] is lepton's `prompt_embedding`.
"""
import dataclasses
import json
import re

from etils import epath
import jax
import numpy as np
import safetensors.numpy

from lepton_jax import tree
from lepton_jax.hf import tensors as hf_tensors
from lepton_jax.hf.family import Family, TensorMap
from lepton_jax.model import ModelConfig, prompt
from lepton_jax.model.config import LORA_TARGETS, LoraConfig, PeftConfig

CONFIG = 'adapter_config.json'
WEIGHTS = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'
_SHORTHAND = {path: name for name, path in LORA_TARGETS.items()}  # 'attn/query' -> 'q'
# adapter_config.json fields that change what the adapter computes, and the value lepton needs.
_MUST_BE = {'peft_type': ('LORA', 'ADALORA'), 'bias': ('none',), 'modules_to_save': (None, []),
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
  path, peft = _read(adapter_dir)
  adalora = peft.get('peft_type') == 'ADALORA'
  for field, allowed in _MUST_BE.items():
    if adalora and field == 'rank_pattern':  # AdaLoRA's pruned ranks, placed on loading.
      continue
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
  return LoraConfig(targets=targets, rank=peft['init_r'] if adalora else peft['r'],
                    alpha=float(peft['lora_alpha']), dropout=float(peft.get('lora_dropout') or 0.0),
                    rslora=bool(peft.get('use_rslora')), dora=bool(peft.get('use_dora')),
                    svd=adalora)


def _read(adapter_dir: str) -> tuple[epath.Path, dict]:
  path = epath.Path(adapter_dir) / CONFIG
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: not a PEFT adapter directory')
  return path, json.loads(path.read_text())


def read_model_config(adapter_dir: str, hf_family: Family, cfg: ModelConfig) -> ModelConfig:
  """`cfg` (the base's) with the adapters of a PEFT directory: LoRA, AdaLoRA or prompt tuning."""
  path, peft = _read(adapter_dir)
  peft_type = peft.get('peft_type')
  if peft_type == 'PROMPT_TUNING':
    shape = (peft.get('num_transformer_submodules'), peft.get('token_dim'))
    if shape != (1, cfg.d_model):
      raise ValueError(f'{path}: num_transformer_submodules, token_dim={shape}; a decoder of '
                       f'd_model {cfg.d_model} needs (1, {cfg.d_model})')
    return dataclasses.replace(cfg, peft=PeftConfig(
        'prompt', num_virtual_tokens=peft['num_virtual_tokens'],
        prompt_init='random' if peft.get('prompt_tuning_init') == 'RANDOM' else 'vocab'))
  if peft_type not in _MUST_BE['peft_type']:
    raise ValueError(f'{path}: peft_type={peft_type!r} is not supported; lepton reads LORA, '
                     'ADALORA and PROMPT_TUNING adapters')
  lora = read_config(adapter_dir, hf_family, cfg)
  return dataclasses.replace(cfg, lora=lora,
                             peft=PeftConfig('adalora' if lora.svd else 'lora'))


class _Arrays(hf_tensors.Checkpoint):
  """An adapter file's tensors held in memory (AdaLoRA's, once padded to their initial rank)."""

  def __init__(self, directory: epath.Path, arrays: dict[str, np.ndarray]):
    # Not super().__init__: that reads the files, which these arrays replace.
    self.directory, self.arrays = directory, arrays
    self.file_of = {name: WEIGHTS for name in arrays}
    self.shapes = {name: x.shape for name, x in arrays.items()}

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    return self.arrays[name][index]


def adapter_source(adapter_dir: str, cfg: ModelConfig) -> hf_tensors.Checkpoint:
  """The adapter tensors as lepton's params hold them (AdaLoRA's padded to init_r, e [r])."""
  directory = epath.Path(adapter_dir)
  if not cfg.lora.svd:
    return hf_tensors.Checkpoint(directory, single=WEIGHTS)
  arrays = safetensors.numpy.load_file(str(directory / WEIGHTS))
  rank_pattern = _read(adapter_dir)[1].get('rank_pattern') or {}
  for module, keep in rank_pattern.items():
    keep = np.asarray(keep, bool)
    for name, axis in (('lora_A', 0), ('lora_E', 0), ('lora_B', 1)):
      key = f'{PREFIX}{module.removesuffix(".lora_E")}.{name}'
      kept = arrays[key]
      padded = np.zeros((*kept.shape[:axis], keep.size, *kept.shape[axis + 1:]), kept.dtype)
      padded[(slice(None),) * axis + (keep,)] = kept
      arrays[key] = padded
  return _Arrays(directory, {name: x[:, 0] if name.endswith('.lora_E') else x
                             for name, x in arrays.items()})


def tensors(hf_family: Family, cfg: ModelConfig) -> dict[str, TensorMap]:
  """TensorMaps of the adapter params `cfg.lora` gives the model, into PEFT's file."""
  result = {prompt.PARAM: TensorMap('prompt_embeddings')}
  weight = '' if cfg.lora.svd else '.weight'  # AdaLoRA's are bare parameters.
  for path, kernel in _adaptable(hf_family, cfg).items():
    name = PREFIX + kernel.hf_name.removesuffix('.weight')
    result[f'{path}/lora_a'] = TensorMap(name + '.lora_A' + weight, transpose=True)
    result[f'{path}/lora_b'] = TensorMap(name + '.lora_B' + weight, transpose=True,
                                         columns=kernel.columns)
    result[f'{path}/lora_e'] = TensorMap(name + '.lora_E')
    result[f'{path}/lora_magnitude'] = TensorMap(name + '.lora_magnitude_vector',
                                                 columns=kernel.columns)
  return result


def adapter_config(hf_family: Family, cfg: ModelConfig, adapter: dict) -> dict:
  """adapter_config.json for `adapter` (adapters.adapter_of the model's params)."""
  if cfg.peft.method == 'prompt':
    return dict(peft_type='PROMPT_TUNING', task_type='CAUSAL_LM',
                num_virtual_tokens=cfg.peft.num_virtual_tokens, token_dim=cfg.d_model,
                num_transformer_submodules=1, num_attention_heads=cfg.num_heads,
                num_layers=cfg.num_layers, inference_mode=True, base_model_name_or_path=None,
                prompt_tuning_init='SAMPLE_VOCAB' if cfg.peft.prompt_init == 'vocab' else 'RANDOM')
  adapted = sorted({name.rsplit('/', 1)[0] for name in tree.names(adapter)})
  if any(tensor.columns for tensor in _adaptable(hf_family, cfg).values()):
    raise ValueError(f'hf.save_adapter: {hf_family.architecture} packs q, k and v into one '
                     'tensor, whose PEFT adapter shares one A; lepton adapts them separately')
  modules = _adaptable(hf_family, cfg)
  target_modules = sorted({_module_name(modules[re.sub(r'^layers(_\d+)?', 'layers', path)], 0)
                           .rsplit('.', 1)[-1] for path in adapted})
  lora = cfg.lora
  config = dict(
      peft_type='LORA', task_type='CAUSAL_LM', r=lora.rank, lora_alpha=lora.alpha,
      lora_dropout=lora.dropout, use_rslora=lora.rslora, use_dora=lora.dora,
      target_modules=target_modules, bias='none', fan_in_fan_out=False, modules_to_save=None,
      base_model_name_or_path=None, inference_mode=True, init_lora_weights=True)
  if not lora.svd:
    return config
  pattern = rank_pattern(hf_family, cfg, adapter)
  kept = [sum(keep) for keep in pattern.values()]
  del config['r']  # AdaLoraConfig warns on any r but its default; init_r is the rank.
  # The schedule fields are training's; PEFT's AdaLoraConfig refuses a total_step below 1.
  return dict(config, peft_type='ADALORA', init_r=lora.rank,
              target_r=max(1, round(sum(kept) / max(len(kept), 1))), rank_pattern=pattern,
              total_step=1, tinit=0, tfinal=0)


def rank_pattern(hf_family: Family, cfg: ModelConfig, adapter: dict) -> dict[str, list[bool]]:
  """PEFT's rank_pattern of lepton AdaLoRA adapters: which singular values are not zero."""
  modules, pattern = _adaptable(hf_family, cfg), {}
  for name, e in zip(tree.names(adapter), jax.tree.leaves(adapter)):
    if not name.endswith('/lora_e'):
      continue
    path = name.removesuffix('/lora_e')
    match = re.fullmatch(r'layers(_(\d+))?/(.*)', path)
    tensor = modules[f'layers/{match.group(3)}' if match else path]
    e_Mr = np.asarray(e).reshape(-1, e.shape[-1])
    layers = [int(match.group(2))] if match and match.group(2) else range(len(e_Mr))
    for layer, e_r in zip(layers, e_Mr):
      pattern[f'{_module_name(tensor, layer)}.lora_E'] = (e_r != 0).tolist()
  return pattern


def prune_file(directory: epath.Path, pattern: dict[str, list[bool]]) -> None:
  """Rewrites an AdaLoRA adapter file as PEFT saves one: only the kept rows of each module's
  lora_A, lora_E and lora_B (`pattern`), lora_E as [r, 1]."""
  path = directory / WEIGHTS
  arrays = safetensors.numpy.load_file(str(path))
  for module, keep in pattern.items():
    keep = np.asarray(keep, bool)
    base = f'{PREFIX}{module.removesuffix(".lora_E")}'
    arrays[f'{base}.lora_A'] = arrays[f'{base}.lora_A'][keep]
    arrays[f'{base}.lora_E'] = arrays[f'{base}.lora_E'][keep][:, None]
    arrays[f'{base}.lora_B'] = arrays[f'{base}.lora_B'][:, keep]
  # Fancy indexing can leave a strided array, whose raw buffer safetensors would write as is.
  safetensors.numpy.save_file({name: np.ascontiguousarray(x) for name, x in arrays.items()},
                              str(path), metadata={'format': 'pt'})
