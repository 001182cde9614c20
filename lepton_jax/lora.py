"""LoRA adapters as pytrees: which params they are, merging them into kernels, switching them.

The adapters themselves live in the one Dense layer (model/layers.py) as params named `lora_a`,
`lora_b` (and `lora_magnitude` with DoRA) beside the kernel they adapt, with logical axes that
shard them like it. Everything here is a transform of a params tree:

  adapter_of(params)          the adapter leaves alone (a few MB for a 1B base at r=8)
  with_adapter(params, a)     the base with adapter `a` in place: switch adapters per call
  AdapterSet, chosen          named adapters over one base, picked per call by name
  stack, per_row              a batch whose rows use different adapters (serving)
  merge(model, variables)     kernels with the adapters folded in, as a plain (rank-0) model
  unmerge(...)                the inverse for plain LoRA
"""
import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp

from lepton_jax import tree
from lepton_jax.model import ModelConfig, Transformer, layers
from lepton_jax.model.config import LoraConfig, PeftConfig

ADAPTER_PARAMS = ('lora_a', 'lora_b', 'lora_magnitude', 'lora_e')  # lora_e: AdaLoRA's.
# The adapter leaves; also config.trainable when LoRA is on and trainable is left at its default.
ADAPTERS = (r'(.*/)?lora_(a|b|magnitude|e)',)
B_PARAMS = (r'(.*/)?lora_b',)  # What LoRA+'s plus_ratio scales.


SCORE = (r'score/.*',)  # A classify head: new, so it trains beside adapters (PEFT's modules_to_save).


def trainable_patterns(config) -> tuple[str, ...]:
  """config.trainable, or the adapters (and a classify head) when LoRA is on and trainable is
  the default."""
  if config.lora.targets and tuple(config.trainable) == ('.*',):
    return ADAPTERS + (SCORE if config.model.head == 'classify' else ())
  return tuple(config.trainable)


def check_targets(lora: LoraConfig, variables: dict, tie_embeddings: bool) -> None:
  """Every target names at least one Dense layer of `variables` (abstract or real; a Dense's
  kernel is a float param or, over an int8 base, a `quant` variable)."""
  if not lora.enabled:
    return
  modules = sorted({name.split('/', 1)[1].rsplit('/', 1)[0] for name in tree.names(variables)
                    if name.endswith('/kernel')})
  for target, pattern in zip(lora.expanded_targets(), lora.patterns()):
    if not any(re.fullmatch(pattern, module) for module in modules):
      hint = (' (the output head is tied to the embedding table, which carries no adapter)'
              if tie_embeddings and 'head' in target else '')
      raise ValueError(f'config.lora.targets: {target!r} matches no Dense layer{hint}; the model '
                       f'has {modules[:8]}{" ..." if len(modules) > 8 else ""}')


def adapter_of(params: dict) -> dict:
  """The adapter leaves of a params tree (a tree with only those leaves)."""
  return tree.partition(params, tree.mask(params, ADAPTERS))[0]


def base_of(params: dict) -> dict:
  return tree.partition(params, tree.mask(params, ADAPTERS))[1]


def with_adapter(params: dict, adapter: dict) -> dict:
  """`params` with the adapter leaves of `adapter` in place (same targets and rank)."""
  return tree.merge(base_of(params), adapter)


@dataclasses.dataclass
class AdapterSet:
  """One base and named adapters over it, all in memory: each call picks one by name.

    adapters = lora.AdapterSet(variables)            # the base, with or without an adapter
    adapters.add('python', lora.adapter_of(run_variables['params']))
    logits = model.apply(adapters.variables('python'), tokens_BT)

  The base's arrays are shared by every `variables(name)`: switching copies nothing.
  """
  base: dict  # A variables dict without adapter leaves.
  adapters: dict = dataclasses.field(default_factory=dict)

  def __init__(self, variables: dict):
    self.base = dict(variables, params=base_of(variables['params']))
    self.adapters = {}

  def add(self, name: str, adapter: dict) -> None:
    """Adds `adapter` (lora.adapter_of a params tree); all adapters have the same layout."""
    if self.adapters:
      first_name, first = next(iter(self.adapters.items()))
      shapes = lambda a: [(n, x.shape) for n, x in zip(tree.names(a), jax.tree.leaves(a))]
      if shapes(adapter) != shapes(first):
        raise ValueError(f'adapter {name!r} has other targets or rank than {first_name!r}; one '
                         'AdapterSet holds adapters of one lora config')
    self.adapters[name] = adapter

  def variables(self, name: str) -> dict:
    if name not in self.adapters:
      raise ValueError(f'no adapter named {name!r}; loaded: {sorted(self.adapters)}')
    return dict(self.base, params=tree.merge(self.base['params'], self.adapters[name]))


def chosen(variables: 'dict | AdapterSet', adapter: str | None) -> dict:
  """What a model applies: `variables` itself, or adapter `adapter` of an AdapterSet (the
  per-call choice of `generate.generate` and `evaluate.evaluate`)."""
  if isinstance(variables, AdapterSet):
    if adapter is None:
      raise ValueError(f'a lora.AdapterSet needs adapter=NAME; loaded: {sorted(variables.adapters)}')
    return variables.variables(adapter)
  if adapter is not None:
    raise ValueError(f'adapter={adapter!r} picks an adapter of a lora.AdapterSet, but the '
                     'variables given are one model\'s')
  return variables


def stack(adapters: Sequence[dict]) -> dict:
  """Adapters of one layout (adapter_of trees) stacked on a new leading axis, for per_row."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *adapters)


def per_row(cfg: ModelConfig, stacked: dict, adapter_ids_B: jax.Array) -> dict:
  """A `lora_rows` collection (model/layers.py): row b of a batch adapted by adapter
  adapter_ids_B[b] of `stacked` (lora.stack's), as punica and S-LoRA batch requests of different
  adapters. Add it to the base's variables (without adapter leaves); plain LoRA only."""
  if cfg.lora.dora:
    raise ValueError('lora.per_row: DoRA rescales each output column by a norm of the whole '
                     'adapted kernel, which one batch of mixed adapters cannot share; serve '
                     'DoRA adapters merged, one per server')
  if cfg.lora.svd:
    raise ValueError('lora.per_row: AdaLoRA adapters (with singular values lora_e) are served '
                     'merged (lora.merge), one per server')

  def gather(name, leaf):
    rows = jnp.take(leaf, adapter_ids_B, axis=0)  # [B, (L,) ...]
    return jnp.moveaxis(rows, 0, 1) if _stacked(cfg, name) else rows  # Scanned: [L, B, ...].

  return {layers.LORA_ROWS: tree.map_with_names(gather, stacked)}


def _adapted_modules(params: dict) -> dict[str, dict]:
  """Module path -> its params dict, for every Dense that carries an adapter."""
  modules = {}

  def visit(node, path):
    if 'lora_a' in node:
      modules['/'.join(path)] = node
    for key, child in node.items():
      if isinstance(child, dict):
        visit(child, path + (key,))

  visit(params, ())
  return modules


def delta(module: dict, lora: LoraConfig, stacked: bool) -> jax.Array:
  """scale * A B in the kernel's shape (one per layer when `stacked`, as under scan_layers)."""
  lead = 1 if stacked else 0
  a, b = module['lora_a'].astype(jnp.float32), module['lora_b'].astype(jnp.float32)
  a_2d = a.reshape(*a.shape[:lead], -1, a.shape[-1])  # [(L,) in, r]
  if 'lora_e' in module:  # AdaLoRA: P diag(e) Q.
    a_2d = a_2d * module['lora_e'].astype(jnp.float32)[..., None, :]
  b_2d = b.reshape(*b.shape[:lead + 1], -1)  # [(L,) r, out]
  return lora.scale * (a_2d @ b_2d).reshape(module['kernel'].shape)


def _stacked(cfg: ModelConfig, module_path: str) -> bool:
  return cfg.scan_layers and module_path.split('/')[0] == 'layers'


def merge(model: Transformer, variables: dict) -> tuple[Transformer, dict]:
  """(a model without adapters, its variables): each adapted kernel becomes W + scale A B, or
  m (W + scale A B) / ||W + scale A B|| with DoRA. Logits equal the adapted model's."""
  cfg = model.cfg
  params = tree.merge(variables['params'])  # New dicts: the caller's tree is left as it was.
  for path, module in _adapted_modules(params).items():
    kernel, stacked = module['kernel'], _stacked(cfg, path)
    merged = kernel.astype(jnp.float32) + delta(module, cfg.lora, stacked)
    if cfg.lora.dora:
      in_dims = _in_dims(kernel, module['lora_magnitude'], stacked)
      magnitude = jnp.expand_dims(module['lora_magnitude'].astype(jnp.float32), in_dims)
      merged = merged / jnp.linalg.norm(merged, axis=in_dims, keepdims=True) * magnitude
    for name in ADAPTER_PARAMS:
      module.pop(name, None)
    module['kernel'] = merged.astype(kernel.dtype)
  plain = Transformer(dataclasses.replace(cfg, lora=LoraConfig(), peft=PeftConfig()))
  return plain, dict(variables, params=params)


def _in_dims(kernel, magnitude, stacked: bool) -> tuple[int, ...]:
  num_in = kernel.ndim - magnitude.ndim
  return tuple(range(1, num_in + 1)) if stacked else tuple(range(num_in))


def unmerge(model: Transformer, merged_variables: dict, adapter: dict,
            lora: LoraConfig) -> tuple[Transformer, dict]:
  """The inverse of `merge` for plain LoRA: W = W_merged - scale A B, adapters back in place."""
  if lora.dora:
    raise ValueError('lora.unmerge: a DoRA merge rescales each column by m / ||W + scale A B||, '
                     'which the merged kernel alone cannot undo; keep the unmerged variables')
  cfg = dataclasses.replace(model.cfg, lora=lora)
  params = tree.merge(merged_variables['params'], adapter)
  for path, module in _adapted_modules(params).items():
    kernel = module['kernel']
    unmerged = kernel.astype(jnp.float32) - delta(module, lora, _stacked(cfg, path))
    module['kernel'] = unmerged.astype(kernel.dtype)
  return Transformer(cfg), dict(merged_variables, params=params)

