"""What every Hugging Face family module provides, and the config fields families share.

A family module (llama.py, mistral.py, qwen2.py, qwen3.py, gpt2.py) maps one `model_type` both
ways: its config.json <-> the architecture fields of lepton's ModelConfig, and its tensor names
and layouts <-> lepton's param paths (`TensorMap`s, read and written by hf/tensors.py).

Reading refuses any config value lepton cannot express (`unsupported`), naming the field: a
silently different model is worse than none. Writing refuses a ModelConfig the family cannot
express, naming the lepton field.
"""
import dataclasses
from typing import Any, Callable

from lepton_jax.model import ModelConfig

# Values of the rope fields when rope_scaling is 'none' (they are then unused).
NO_ROPE_SCALING = dict(rope_scaling='none', rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                       rope_high_freq_factor=4.0, rope_original_max_len=8192)


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """Where a lepton param lives in a Hugging Face checkpoint.

  The lepton param (one layer's slice of it, for per-layer params) is a reshape of the HF
  tensor's *view*: the tensor, transposed when `transpose` (torch Linear stores [out, in]), then
  restricted to `columns` of its last axis when given (GPT-2 packs q, k, v into one tensor).
  """
  hf_name: str  # '{i}' stands for the layer index in per-layer tensors.
  transpose: bool = False
  columns: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str
  architecture: str  # config.json `architectures[0]`, the transformers class.
  read_config: Callable[[dict], dict]  # config.json -> ModelConfig architecture fields.
  write_config: Callable[[ModelConfig], dict]  # -> config.json fields, or unexpressible().
  # ModelConfig -> lepton param path -> TensorMap. Per-layer paths start 'layers/' (the layer
  # index and scan stacking are the reader's and writer's business).
  tensors: Callable[[ModelConfig], dict[str, TensorMap]]
  # HF tensor names that are buffers, not weights (rotary tables, causal masks): ignored.
  buffers: tuple[str, ...] = ()


def unsupported(field: str, value: Any, why: str) -> ValueError:
  return ValueError(f'config.json field {field}={value!r}: {why}; lepton cannot express this model')


def unexpressible(family: str, field: str, value: Any, why: str) -> ValueError:
  return ValueError(f'{family}: model.{field}={value!r} {why}')


def require(hf: dict, field: str, allowed: tuple, default: Any = None) -> Any:
  """hf[field] (or `default` when absent), which must be one of `allowed`."""
  value = hf.get(field, default)
  if value not in allowed:
    raise unsupported(field, value, f'lepton supports {allowed}')
  return value


def read_rope(hf: dict) -> dict:
  """Rope fields from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
  params = hf.get('rope_parameters') or {}
  field = 'rope_parameters'
  if not params:
    params = dict(hf.get('rope_scaling') or {}, rope_theta=hf.get('rope_theta', 10_000.0))
    field = 'rope_scaling'
  rope_type = params.get('rope_type', params.get('type', 'default'))
  fields = dict(NO_ROPE_SCALING, rope_theta=float(params.get('rope_theta', 10_000.0)))
  if rope_type == 'llama3':
    fields.update(rope_scaling='llama3', rope_scaling_factor=float(params['factor']),
                  rope_low_freq_factor=float(params['low_freq_factor']),
                  rope_high_freq_factor=float(params['high_freq_factor']),
                  rope_original_max_len=int(params['original_max_position_embeddings']))
  elif rope_type != 'default':
    raise unsupported(f'{field}.rope_type', rope_type, "lepton supports 'default' and 'llama3'")
  if hf.get('partial_rotary_factor', 1.0) != 1.0:
    raise unsupported('partial_rotary_factor', hf['partial_rotary_factor'],
                      'lepton rotates whole heads')
  return fields


def write_rope(cfg: ModelConfig) -> dict:
  params = {'rope_theta': cfg.rope_theta, 'rope_type': 'default'}
  if cfg.rope_scaling == 'llama3':
    params.update(rope_type='llama3', factor=cfg.rope_scaling_factor,
                  low_freq_factor=cfg.rope_low_freq_factor,
                  high_freq_factor=cfg.rope_high_freq_factor,
                  original_max_position_embeddings=cfg.rope_original_max_len)
  return {'rope_parameters': params}


def require_fields(family: str, cfg: ModelConfig, **wanted) -> None:
  """Raises naming the first ModelConfig field that differs from what `family` can express."""
  for field, allowed in wanted.items():
    allowed = allowed if isinstance(allowed, tuple) else (allowed,)
    value = getattr(cfg, field)
    if value not in allowed:
      raise unexpressible(family, field, value, f'(the family needs {" or ".join(map(repr, allowed))})')
