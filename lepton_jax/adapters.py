"""The parameter-efficient methods (config.peft.method) as one mechanism: which params each adds,
that they alone train over the frozen base, and their settings' checks.

  lora, adalora      low-rank adapters in the one Dense (lepton_jax/lora.py, lepton_jax/adalora.py)
  houlsby, pfeiffer  bottleneck adapters after a block's attention and MLP, or its MLP alone
                     (model/bottleneck.py)
  prompt             virtual-token embeddings before every row (model/prompt.py)

Each adds params by name beside the base's, so the trainable/frozen split (config.trainable,
lepton_jax/tree.py), adapter-only checkpoints, `adapter_of` / `base_of` and switching adapters
(lora.AdapterSet) are the same for all; a fresh adapter of any method leaves the logits unchanged.
"""
import ml_collections

from lepton_jax import lora, tree
from lepton_jax.model import prompt
from lepton_jax.model.config import BOTTLENECK_METHODS

BOTTLENECK = (r'(.*/)?(attn|mlp)_adapter/(down|up)/(kernel|bias)',)
PROMPT = (prompt.PARAM,)
PATTERNS = {'lora': lora.ADAPTERS, 'adalora': lora.ADAPTERS, 'houlsby': BOTTLENECK,
            'pfeiffer': BOTTLENECK, 'prompt': PROMPT}
ADAPTERS = lora.ADAPTERS + BOTTLENECK + PROMPT  # Every method's params.


def trainable_patterns(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """config.trainable, or the method's adapters when one is on and trainable is the default."""
  if config.peft.method in ('lora', 'adalora'):
    return lora.trainable_patterns(config)
  if tuple(config.trainable) == ('.*',):
    return PATTERNS[config.peft.method]
  return tuple(config.trainable)


def adapter_of(params: dict) -> dict:
  """The adapter leaves (of any method) of a params tree."""
  return tree.partition(params, tree.mask(params, ADAPTERS))[0]


def base_of(params: dict) -> dict:
  return tree.partition(params, tree.mask(params, ADAPTERS))[1]


def validate(config: ml_collections.ConfigDict) -> None:
  """One-line errors for config.peft settings that cannot train (config_lib.validate calls it)."""
  peft, method, targets = config.peft, config.peft.method, tuple(config.lora.targets)
  if method == 'adalora' and not targets:
    raise ValueError("config.peft.method='adalora' adapts config.lora.targets: set them (e.g. "
                     "('all-linear',))")
  if method not in ('lora', 'adalora') and targets:
    raise ValueError(f'config.peft.method={method!r} trains its own adapters: leave '
                     f'config.lora.targets={targets} empty (or use lora or adalora)')
  if method == 'adalora':
    rank = config.lora.rank
    if not 0 < peft.target_rank <= rank:
      raise ValueError(f'config.peft.target_rank={peft.target_rank}: must be in [1, '
                       f'config.lora.rank={rank}], the initial rank AdaLoRA prunes from')
    if config.lora.dora:
      raise ValueError("config.lora.dora=True: AdaLoRA's SVD adapters have no DoRA form (PEFT "
                       'refuses it too)')
    if peft.tfinal < 1 or peft.tinit < 0 or peft.delta_t < 1:
      raise ValueError(f'config.peft.tfinal={peft.tfinal}, tinit={peft.tinit}, delta_t='
                       f'{peft.delta_t}: need tfinal >= 1 (the ranks are final from step '
                       'total_steps - tfinal), tinit >= 0 and delta_t >= 1')
    if peft.tinit + peft.tfinal >= config.total_steps:
      raise ValueError(f'config.peft.tinit={peft.tinit} + tfinal={peft.tfinal} leaves no '
                       f'pruning step within config.total_steps={config.total_steps}')
    if not (0 < peft.beta1 < 1 and 0 < peft.beta2 < 1) or peft.orth_reg_weight < 0:
      raise ValueError('config.peft.beta1 and beta2 must be in (0, 1) and orth_reg_weight >= 0')
  if method in BOTTLENECK_METHODS and peft.bottleneck <= 0:
    raise ValueError(f'config.peft.bottleneck={peft.bottleneck}: must be positive')
  if method == 'prompt':
    virtual = peft.num_virtual_tokens
    if virtual <= 0:
      raise ValueError(f'config.peft.num_virtual_tokens={virtual}: prompt tuning needs at least '
                       'one virtual token')
    if config.seq_len + virtual > config.model.max_seq_len:
      raise ValueError(f'config.seq_len={config.seq_len} + config.peft.num_virtual_tokens='
                       f'{virtual} exceeds config.model.max_seq_len={config.model.max_seq_len}, '
                       'the positions the base has')
    if config.data.source == 'jsonl' and config.data.packing:
      raise ValueError("config.peft.method='prompt' prepends virtual tokens to each row, which "
                       'packed examples would not see: set config.data.packing=False')
