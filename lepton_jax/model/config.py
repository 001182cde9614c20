"""The model's configuration: the plain values every module of the model is built from."""
import dataclasses
import re

import ml_collections

# The ModelConfig fields a checkpoint determines: what the model computes. The others (attention
# implementation, scan, remat, dtypes, dropout) say how lepton runs it.
ARCHITECTURE_FIELDS = (
    'vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'd_ff', 'mlp',
    'norm', 'norm_eps', 'positions', 'rope_theta', 'rope_scaling', 'rope_scaling_factor',
    'rope_low_freq_factor', 'rope_high_freq_factor', 'rope_original_max_len', 'max_seq_len',
    'sliding_window', 'qkv_bias', 'out_bias', 'mlp_bias', 'tie_embeddings', 'qk_norm')


# lora.targets shorthands -> the Dense module paths they name (below 'layers_{i}/' or 'layers/').
LORA_TARGETS = {'q': 'attn/query', 'k': 'attn/key', 'v': 'attn/value', 'o': 'attn/out',
                'gate': 'mlp/gate', 'up': 'mlp/up', 'down': 'mlp/down'}
LORA_INITS = ('kaiming', 'gaussian')  # How A starts (B starts at zero): PEFT's two defaults.


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the Dense layers `targets` names (config.lora); no targets: none.

  A Dense with kernel W [*in, *out] gains A [*in, r] and B [r, *out] and computes
  x W + scale * (dropout(x) A) B with scale = alpha / r (alpha / sqrt(r) with rslora). With dora
  (Liu et al. 2024) it also gains a magnitude m [*out], initialised to W's column norms, and
  computes m * x (W + scale A B) / ||W + scale A B|| with the norm over the input dims, held
  constant under differentiation as the paper (and PEFT) do.
  """
  # Shorthands of LORA_TARGETS, 'all-linear' (all of them: every Dense but the output head, as
  # PEFT), or regular expressions over whole Dense module paths such as 'layers_0/attn/query'.
  # Empty: no adapters.
  targets: tuple[str, ...] = ()
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  rslora: bool = False
  dora: bool = False
  init: str = 'kaiming'
  plus_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): B's learning rate over A's.
  # AdaLoRA (config.peft.method='adalora', lepton_jax/adalora.py): SVD form, A and B start
  # N(0, 0.02) and singular values `lora_e` [r] at zero; x W + scale ((x A) * e) B with scale
  # alpha / r (PEFT's alpha / (ranknum + 1e-5)), r the initial rank whatever is pruned.
  svd: bool = False

  @classmethod
  def from_config(cls, lora_config: ml_collections.ConfigDict) -> 'LoraConfig':
    fields = lora_config.to_dict()
    return cls(**dict(fields, targets=tuple(fields['targets'])))

  @property
  def scale(self) -> float:
    if self.svd:
      return self.alpha / (self.rank + 1e-5)
    return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

  def expanded_targets(self) -> tuple[str, ...]:
    """`targets` with 'all-linear' spelled out as every shorthand (other targets kept)."""
    names = (*LORA_TARGETS, *self.targets) if 'all-linear' in self.targets else self.targets
    return tuple(dict.fromkeys(name for name in names if name != 'all-linear'))

  def patterns(self) -> tuple[str, ...]:
    """Regular expressions over Dense module paths, one per expanded target."""
    layer = r'layers(_\d+)?/'
    return tuple(layer + LORA_TARGETS[name] if name in LORA_TARGETS else name
                 for name in self.expanded_targets())

  @property
  def enabled(self) -> bool:
    return bool(self.targets)

  def adapts(self, module_path: str) -> bool:
    return self.enabled and any(re.fullmatch(p, module_path) for p in self.patterns())


# config.peft.method: LoRA and its SVD form AdaLoRA adapt Dense layers (config.lora.targets), the
# bottleneck adapters add modules to each block, prompt tuning prepends learned embeddings.
PEFT_METHODS = ('lora', 'adalora', 'houlsby', 'pfeiffer', 'prompt')
BOTTLENECK_METHODS = ('houlsby', 'pfeiffer')
ADAPTER_ACTIVATIONS = ('relu', 'gelu', 'silu')
PROMPT_INITS = ('vocab', 'random')


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """What the model needs of config.peft (lepton_jax/adapters.py says what each method trains).

  houlsby (Houlsby et al. 2019): h + up(act(down(h))) on the output h of attention and of the MLP
  of every block, before its residual add; pfeiffer: on the MLP's only. down [D, bottleneck] and
  up [bottleneck, D] with biases; up starts at zero, so a fresh adapter is the identity.
  prompt (Lester et al. 2021): `num_virtual_tokens` learned embeddings [N, D] before every row, at
  positions 0..N-1 (the row's tokens follow from N); logits are the row's tokens' only.
  """
  method: str = 'lora'
  bottleneck: int = 16
  activation: str = 'relu'
  num_virtual_tokens: int = 0
  prompt_init: str = 'vocab'  # vocab: the table's rows of random tokens; random: N(0, .02).
  seed: int = 0  # Which vocabulary rows 'vocab' copies.

  @classmethod
  def from_config(cls, peft_config: ml_collections.ConfigDict, seed: int = 0) -> 'PeftConfig':
    return cls(method=peft_config.method, bottleneck=peft_config.bottleneck,
               activation=peft_config.activation,
               num_virtual_tokens=peft_config.num_virtual_tokens,
               prompt_init=peft_config.prompt_init, seed=seed)

  @property
  def virtual_tokens(self) -> int:
    """Positions the virtual tokens take before every row (0 unless prompt tuning)."""
    return self.num_virtual_tokens if self.method == 'prompt' else 0

  def adapts_block(self, sublayer: str) -> bool:
    """Whether a bottleneck adapter follows the block's 'attn' or 'mlp'."""
    return self.method == 'houlsby' or self.method == 'pfeiffer' and sublayer == 'mlp'


# config.quant choices (lepton_jax/quant.py says what each computes).
QUANT_WEIGHTS = ('none', 'int8')
QUANT_GRANULARITIES = ('channel', 'tensor', 'group')  # Of the weights' scales.
QUANT_ACTIVATIONS = ('none', 'int8')
QUANT_ACTIVATION_GRANULARITIES = ('token', 'tensor')
QUANT_KV_CACHES = ('none', 'int8')
QUANT_KERNELS = ('auto', 'xla', 'pallas')  # lepton_jax/kernels/int8_matmul.py IMPLEMENTATIONS.

# ModelConfig.head: lm, next-token logits [B, T, V]; classify, a `score` Dense [D, num_labels]
# (no bias, as transformers' *ForSequenceClassification) on one pooled hidden state per row,
# logits [B, num_labels].
HEADS = ('lm', 'classify')
# ModelConfig.pool (classify): last, the final hidden state of each row's rightmost token that is
# not pad_id (transformers' rule); mean, the mean over the row's tokens that are not pad_id.
POOLS = ('last', 'mean')


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Post-training int8 quantization (config.quant): of which weights, how, and of the KV cache.

  A quantized Dense keeps no float kernel: its `quant` collection holds `kernel` int8
  [*out, *in] (the layout XLA:CPU's int8 dot runs fastest) and `scale` float32, per output
  channel [*out], per tensor [] or per group of `group_size` consecutive inputs (the input dims
  flattened) [*out, prod(in) // group_size]. W8A8 (activations='int8') also quantizes the Dense's
  input per token (or per tensor) and runs an int8 x int8 -> int32 matmul.

  With `qat` (quantization-aware training) the weights stay float params and each layer computes
  with the values its int8 weights (and W8A8 activations) would have, passing gradients straight
  through the rounding; lepton_jax/quant.py then turns the trained float weights into the int8
  model that computes what was trained.
  """
  weights: str = 'none'
  granularity: str = 'channel'
  group_size: int = 128
  activations: str = 'none'
  activation_granularity: str = 'token'
  kv_cache: str = 'none'  # int8: keys and values int8 with a scale per (token, kv head).
  embed: bool = False  # Quantize the embedding table too (per row), and a tied head with it.
  head: bool = False  # Quantize the output head (the most sensitive matmul).
  exclude: tuple[str, ...] = ()  # Regular expressions over Dense paths left in float.
  kernel: str = 'auto'  # auto: Pallas on TPU and GPU, XLA elsewhere; xla | pallas force one.
  qat: bool = False  # Fake-quantized float weights that train (see above).

  @classmethod
  def from_config(cls, quant_config: ml_collections.ConfigDict) -> 'QuantConfig':
    fields = quant_config.to_dict()
    return cls(**dict(fields, exclude=tuple(fields['exclude'])))

  @property
  def enabled(self) -> bool:
    return self.weights != 'none' or self.kv_cache != 'none'

  def check(self, tie_embeddings: bool) -> None:
    """Raises a one-line ValueError naming the config.quant key of a combination that cannot run."""
    if self.activations != 'none' and self.weights == 'none':
      raise ValueError(f'config.quant.activations={self.activations!r} needs config.quant.weights='
                       "'int8' (W8A8 multiplies int8 activations by int8 weights)")
    if self.activations != 'none' and self.granularity == 'group':
      raise ValueError("config.quant.granularity='group' is weight-only: set config.quant."
                       "activations='none' or a 'channel' or 'tensor' granularity")
    if self.group_size <= 0:
      raise ValueError(f'config.quant.group_size={self.group_size}: must be positive')
    if self.qat and self.weights == 'none':
      raise ValueError("config.quant.qat=True trains through int8 weights: set config.quant."
                       "weights='int8' (and the scheme to export)")
    if tie_embeddings and self.weights != 'none' and self.head != self.embed:
      raise ValueError(f'config.quant.head={self.head} and config.quant.embed={self.embed}: with '
                       'tied embeddings the head is the embedding table, so set both alike')

  @property
  def embeds(self) -> bool:
    """Whether the embedding table is int8 (and with it a tied head)."""
    return self.weights != 'none' and self.embed

  @property
  def stores_int8(self) -> bool:
    """Whether the weights it quantizes are int8 variables (else, with qat, float params)."""
    return self.weights != 'none' and not self.qat

  def quantizes(self, module_path: str) -> bool:
    """Whether the Dense at `module_path` ('layers_0/attn/query', 'head') holds int8 weights."""
    if self.weights == 'none' or module_path == 'head' and not self.head:
      return False
    return not any(re.fullmatch(pattern, module_path) for pattern in self.exclude)


# config.prune choices (lepton_jax/prune.py says what each computes).
PRUNE_METHODS = ('none', 'magnitude', 'n:m', 'heads', 'ffn')
STRUCTURED_METHODS = ('heads', 'ffn')  # Those that remove whole units: a smaller model.
PRUNE_SCOPES = ('layer', 'global')
PRUNE_IMPORTANCES = ('norm', 'taylor')
PRUNE_SCHEDULES = ('one_shot', 'gradual')

# Per structured method, the weights of one unit in a block: (module path, param, unit axis). A
# head's query rows and output columns (with MHA, where heads are kv heads, its key and value
# too: KV_WEIGHTS); an FFN channel's up and gate columns and down rows.
HEAD_WEIGHTS = (('attn/query', 'kernel', 1), ('attn/query', 'bias', 0), ('attn/out', 'kernel', 0))
KV_WEIGHTS = (('attn/key', 'kernel', 1), ('attn/key', 'bias', 0), ('attn/value', 'kernel', 1),
              ('attn/value', 'bias', 0))
FFN_WEIGHTS = (('mlp/up', 'kernel', 1), ('mlp/up', 'bias', 0), ('mlp/gate', 'kernel', 1),
               ('mlp/gate', 'bias', 0), ('mlp/down', 'kernel', 0))
# The kernels whose masks prune a unit while training: zero, they remove its every contribution
# (its output weights) and gradient (its input weights), whatever the kv grouping.
UNIT_KERNELS = {method: tuple((module, param, axis) for module, param, axis in weights
                              if param == 'kernel')
                for method, weights in (('heads', HEAD_WEIGHTS), ('ffn', FFN_WEIGHTS))}


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """Pruning (config.prune). Each Dense a method masks holds a bool mask in the `prune`
  collection, the shape of the 2-D matrix its matmul multiplies ([prod(in), prod(out)],
  matmul_2d's view), and multiplies its kernel by it: pruned weights then get no gradient, and
  the pruning schedule zeroes them and their optimizer moments. magnitude and n:m mask the Dense
  layers `layers` names; heads and ffn the UNIT_KERNELS of every block.
  """
  method: str = 'none'
  scope: str = 'layer'  # magnitude: each Dense to `sparsity` | one threshold over all of them.
  sparsity: float = 0.5  # magnitude, heads, ffn: the fraction of weights (units) removed.
  n: int = 2  # n:m: n of every m consecutive inputs of a Dense are kept.
  m: int = 4
  importance: str = 'norm'  # heads, ffn: the weights' L2 norm | first-order Taylor.
  importance_batches: int = 4  # taylor: the training batches its gradients are summed over.
  schedule: str = 'one_shot'  # At begin_step | Zhu & Gupta's cubic ramp to end_step.
  begin_step: int = 0
  end_step: int = 0
  every_steps: int = 100  # gradual: steps between two mask updates.
  initial_sparsity: float = 0.0  # gradual: the sparsity of the first update.
  layers: tuple[str, ...] = (r'layers(_\d+)?/.*',)  # Dense module paths (not the head).

  @classmethod
  def from_config(cls, prune_config: ml_collections.ConfigDict) -> 'PruneConfig':
    fields = prune_config.to_dict()
    return cls(**dict(fields, layers=tuple(fields['layers'])))

  @property
  def structured(self) -> bool:
    return self.method in STRUCTURED_METHODS

  def masks(self, module_path: str) -> bool:
    """Whether the Dense at `module_path` ('layers_0/attn/query') holds a pruning mask."""
    if self.structured:
      return any(re.fullmatch(rf'layers(_\d+)?/{module}', module_path)
                 for module, _, _ in UNIT_KERNELS[self.method])
    return self.method != 'none' and any(re.fullmatch(pattern, module_path)
                                         for pattern in self.layers)

  def check(self) -> None:
    """Raises a one-line ValueError naming the config.prune key of a setting that cannot run."""
    if self.method == 'none':
      return
    if not 0.0 <= self.sparsity < 1.0:
      raise ValueError(f'config.prune.sparsity={self.sparsity}: must be in [0, 1)')
    if not 0.0 <= self.initial_sparsity <= self.sparsity:
      raise ValueError(f'config.prune.initial_sparsity={self.initial_sparsity}: must be in '
                       f'[0, config.prune.sparsity={self.sparsity}]')
    if self.method == 'n:m' and not 0 < self.n <= self.m:
      raise ValueError(f'config.prune.n={self.n} with config.prune.m={self.m}: n:m keeps n of '
                       'every m weights, so 0 < n <= m')
    if self.schedule == 'gradual' and self.method == 'n:m':
      raise ValueError("config.prune.schedule='gradual' ramps a sparsity (magnitude, heads, "
                       "ffn); config.prune.method='n:m' is one-shot")
    if self.schedule == 'gradual' and not (self.end_step > self.begin_step >= 0 and
                                           self.every_steps > 0):
      raise ValueError(f'config.prune.begin_step={self.begin_step}, end_step={self.end_step}, '
                       f'every_steps={self.every_steps}: gradual pruning needs 0 <= begin_step < '
                       'end_step and every_steps > 0')
    if self.importance_batches <= 0:
      raise ValueError(f'config.prune.importance_batches={self.importance_batches}: must be '
                       'positive')


# ModelConfig fields that a config keeps in groups of their own (config.lora, config.quant, ...).
GROUP_FIELDS = ('lora', 'quant', 'prune', 'peft')


def model_fields(cfg: 'ModelConfig') -> dict:
  """The fields of `cfg` that config.model holds: what a saved config.json writes there."""
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in GROUP_FIELDS}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Plain values for the model; `from_config` reads them from `config.model`."""
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  mlp: str
  norm: str
  norm_eps: float
  positions: str
  rope_theta: float
  rope_scaling: str
  rope_scaling_factor: float
  rope_low_freq_factor: float
  rope_high_freq_factor: float
  rope_original_max_len: int
  max_seq_len: int
  sliding_window: int
  qkv_bias: bool
  out_bias: bool
  mlp_bias: bool
  tie_embeddings: bool
  qk_norm: bool
  dropout: float
  attention: str
  scan_layers: bool
  remat: str
  param_dtype: str
  dtype: str
  head: str = 'lm'
  num_labels: int = 0
  pool: str = 'last'
  pad_id: int = -1  # classify: the id that pads rows (-1 before the tokenizer resolves it).
  attention_block_q: int = 512  # The splash kernel's blocks (config_lib.model_config).
  attention_block_kv: int = 512
  lora: LoraConfig = LoraConfig()
  quant: QuantConfig = QuantConfig()
  prune: PruneConfig = PruneConfig()
  peft: PeftConfig = PeftConfig()

  @classmethod
  def from_config(cls, model_config: ml_collections.ConfigDict,
                  lora_config: ml_collections.ConfigDict | None = None,
                  quant_config: ml_collections.ConfigDict | None = None,
                  prune_config: ml_collections.ConfigDict | None = None,
                  peft_config: ml_collections.ConfigDict | None = None,
                  seed: int = 0) -> 'ModelConfig':
    """`peft_config` (config.peft) picks the method; with 'adalora' config.lora's adapters take
    the SVD form."""
    lora = LoraConfig.from_config(lora_config) if lora_config is not None else LoraConfig()
    quant = QuantConfig.from_config(quant_config) if quant_config is not None else QuantConfig()
    prune = PruneConfig.from_config(prune_config) if prune_config is not None else PruneConfig()
    peft = (PeftConfig.from_config(peft_config, seed) if peft_config is not None
            else PeftConfig())
    if peft.method == 'adalora':
      lora = dataclasses.replace(lora, svd=True)
    return cls(**model_config.to_dict(), lora=lora, quant=quant, prune=prune, peft=peft)
