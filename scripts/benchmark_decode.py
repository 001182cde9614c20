"""Decode speed of any config: prefill and decode tokens/s, ms per decode step, and how close a
step runs to the memory-bound limit; with --compare=transformers, against Hugging Face
transformers' `generate` on the same model, in the same run.

  python scripts/benchmark_decode.py --config=configs/stdlib_tiny.py \
      --config.model.vocab_size=1024 [--batch=8] [--prompt_len=32] [--new_tokens=64] \
      [--rounds=5] [--compare=transformers] [--cpu_devices=2 --config.mesh.tensor=2] \
      [--config.quant.weights=int8 ...] [--variants=f32,bf16,w8,w8a8,w8a8_kv8]

--variants times several settings of the same model in one run, alternating within each round:
each is the config with the overrides VARIANTS names (dtypes, config.quant), its weights the same
random init (quantized as the variant says). `bytes_per_decode_step` and `cache_bytes_per_token`
(every layer's keys and values of one cached token, scales included) come per variant.

Random prompts of prompt_len tokens, greedy, no stop token: every row draws new_tokens tokens,
the first from the prefill, so the decode loop runs new_tokens - 1 steps. Times generate's own
jitted `prefill` and `decode_loop`, compiled before timing; one JSON line per round, then the
medians. A decode step reads every weight (the embedding and position tables only a row per
token, unless the embedding is tied and so also the head) and the whole KV cache; those bytes per
step time are set against the device's memory bandwidth (lepton_jax.flops: vendor figures for TPUs
and GPUs; on CPU the rate at which XLA streams that many bytes through matrix-vector products).

--compare=transformers (torch eager on CPU; the `hf` extra): lepton's random weights are written
with hf.save and loaded by AutoModelForCausalLM, the same prompts are decoded greedily, and its
prefill and decode times are read off a stopping criterion that notes when each token is drawn.
Each round times lepton_jax, then transformers, so both see the same machine; `speedup` is the
median of the rounds' ratios. On a shared CPU, torch eager collapses under load: quote quiet runs.
"""
import json
import statistics
import tempfile
import time

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax import cli, config_lib, flops, generate, quant, sharding, train_state, tree
from lepton_jax.model import ModelConfig, Transformer
from lepton_jax.model.config import QuantConfig

cli.define_flags()
flags.DEFINE_integer('batch', 8, 'Prompts decoded together.', lower_bound=1)
flags.DEFINE_integer('prompt_len', 32, 'Tokens of every prompt.', lower_bound=1)
flags.DEFINE_integer('new_tokens', 64, 'Tokens drawn per prompt.', lower_bound=2)
flags.DEFINE_integer('rounds', 5, 'Timed rounds; medians are reported.', lower_bound=1)
flags.DEFINE_enum('compare', None, ['transformers'], 'Also time this implementation.')
flags.DEFINE_list('variants', [], 'Settings to time side by side, names of VARIANTS (default: '
                  'the config alone).')
FLAGS = flags.FLAGS

BF16 = {'model.dtype': 'bfloat16', 'model.param_dtype': 'bfloat16'}
W8 = {'quant.weights': 'int8'}
W8A8 = {**W8, 'quant.activations': 'int8'}
KV8 = {'quant.kv_cache': 'int8'}
VARIANTS = {
    'f32': {}, 'bf16': BF16, 'w8': W8, 'w8_tensor': {**W8, 'quant.granularity': 'tensor'},
    'w8_group': {**W8, 'quant.granularity': 'group'}, 'w8a8': W8A8,
    'w8a8_tensor': {**W8A8, 'quant.granularity': 'tensor',
                    'quant.activation_granularity': 'tensor'},
    'kv8': KV8, 'w8_kv8': {**W8, **KV8}, 'w8a8_kv8': {**W8A8, **KV8},
}


def step_bytes(cfg: ModelConfig, variables: dict, cache: dict) -> int:
  """Bytes a decode step reads: the weights (float and int8), tables a row per token aside, and
  the whole cache."""
  weights = {name: variables[name] for name in ('params', 'quant') if name in variables}
  is_table = lambda name: name.endswith('pos_embedding') or (
      not cfg.tie_embeddings and name.split('/')[0] == 'embed')
  return (sum(leaf.nbytes for name, leaf in zip(tree.names(weights), jax.tree.leaves(weights))
              if not is_table(name)) + sum(x.nbytes for x in jax.tree.leaves(cache)))


def cache_bytes_per_token(cache: dict, batch: int) -> float:
  """Every layer's cached key and value (and scales) of one token of one row."""
  leaves = jax.tree.leaves(nn.unbox(cache))
  slots = leaves[0].shape[leaves[0].ndim - 3]  # [(L,) B, S, K, H]: S.
  return sum(x.nbytes for x in leaves) / (batch * slots)


class Lepton:
  """generate's prefill and decode loop on fixed prompts, compiled at construction."""

  def __init__(self, model: Transformer, variables: dict, tokens_BT: np.ndarray, new_tokens: int):
    batch, prompt_len = tokens_BT.shape
    self.model, self.variables, self.new_tokens = model, variables, new_tokens
    self.stops = generate.stop_array([])
    self.prefill_args = (tokens_BT, np.full(batch, prompt_len, np.int32),
                         generate.cache_length(model.cfg, prompt_len + new_tokens - 1),
                         generate.sampling(batch), np.full(batch, new_tokens, np.int32),
                         self.stops)
    self.tokens_BC = self.run()[2]
    self.cache = generate.prefill(model, variables, *self.prefill_args).cache

  def run(self) -> tuple[float, float, np.ndarray]:
    """(prefill seconds, decode seconds, the new tokens)."""
    start = time.perf_counter()
    state = jax.block_until_ready(generate.prefill(self.model, self.variables,
                                                   *self.prefill_args))
    middle = time.perf_counter()
    tokens_BC = jax.block_until_ready(generate.decode_loop(
        self.model, self.variables, state, self.stops, self.new_tokens)[1])
    return middle - start, time.perf_counter() - middle, np.asarray(tokens_BC)


class Transformers:
  """The same weights and prompts through transformers' generate (greedy, torch eager)."""

  def __init__(self, model: Transformer, variables: dict, tokens_BT: np.ndarray, new_tokens: int):
    import torch  # pylint: disable=g-import-not-at-top  (optional: the hf extra)
    import transformers  # pylint: disable=g-import-not-at-top
    from lepton_jax import hf  # pylint: disable=g-import-not-at-top
    self.torch, self.transformers, self.new_tokens = torch, transformers, new_tokens
    with tempfile.TemporaryDirectory() as directory:
      hf.save(model, variables, f'{directory}/model')
      self.model = transformers.AutoModelForCausalLM.from_pretrained(
          f'{directory}/model', dtype=torch.float32).eval()
    self.ids = torch.tensor(tokens_BT, dtype=torch.long)
    self.tokens_BC = self.generate([])[:, tokens_BT.shape[1]:].numpy()

  def generate(self, stopping_criteria: list):
    with self.torch.inference_mode():
      return self.model.generate(
          self.ids, attention_mask=self.torch.ones_like(self.ids), do_sample=False,
          max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, pad_token_id=0,
          stopping_criteria=self.transformers.StoppingCriteriaList(stopping_criteria))

  def run(self) -> tuple[float, float]:
    """(prefill seconds, decode seconds), from when generate drew each token."""
    drawn = []
    clock = lambda input_ids, scores, **_: (drawn.append(time.perf_counter()) or
                                            self.torch.zeros(len(input_ids), dtype=bool))
    start = time.perf_counter()
    self.generate([clock])
    return drawn[0] - start, drawn[-1] - drawn[0]


def rates(prefill_s: float, decode_s: float) -> dict:
  batch, steps = FLAGS.batch, FLAGS.new_tokens - 1
  return {'prefill_tokens_per_sec': round(batch * FLAGS.prompt_len / prefill_s, 1),
          'decode_tokens_per_sec': round(batch * steps / decode_s, 1),
          'ms_per_decode_step': round(1000 * decode_s / steps, 3)}


def build(config, name: str, mesh, rules) -> tuple[Transformer, dict]:
  """The model of `config` with variant `name`'s overrides, its weights random (config.seed) and
  quantized as the variant's config.quant says."""
  config = config_lib.override(config, VARIANTS[name]) if name else config
  config_lib.validate(config)
  float_model = Transformer(ModelConfig.from_config(config.model))
  shardings = train_state.abstract_variables(float_model, mesh, rules, FLAGS.prompt_len)[1]
  variables = jax.jit(lambda: nn.unbox(float_model.init(jax.random.key(config.seed),
                                                        jnp.zeros((1, 8), jnp.int32))),
                      out_shardings=shardings)()
  return quant.quantize(float_model, variables, QuantConfig.from_config(config.quant), mesh,
                        rules)


def main(argv):
  del argv
  cli.initialize_distributed()
  config = FLAGS.config
  config_lib.validate(config)
  if not config.model.vocab_size:
    raise ValueError('config.model.vocab_size=0 would need a tokenizer: give the vocabulary '
                     'size, e.g. --config.model.vocab_size=8192')
  unknown = [name for name in FLAGS.variants if name not in VARIANTS]
  if unknown:
    raise ValueError(f'--variants: {unknown[0]!r} is not one of {tuple(VARIANTS)}')
  names = FLAGS.variants or ['']  # '': the config as given.
  cfg = ModelConfig.from_config(config.model)
  generate.check_prompts(cfg, [[0] * FLAGS.prompt_len], FLAGS.new_tokens)
  mesh, rules = sharding.make_mesh(config.mesh), config.mesh.rules
  label = lambda name: name or 'lepton_jax'
  with sharding.use_mesh(mesh, rules):
    if FLAGS.batch % generate.batch_multiple():
      raise ValueError(f'--batch={FLAGS.batch} does not split over the mesh\'s '
                       f'{generate.batch_multiple()} batch shards')
    tokens_BT = np.random.default_rng(config.seed).integers(
        0, cfg.vocab_size, (FLAGS.batch, FLAGS.prompt_len)).astype(np.int32)
    decoders = {}
    for name in names:
      model, variables = build(config, name, mesh, rules)
      decoders[name] = Lepton(model, variables, tokens_BT, FLAGS.new_tokens)
    first = decoders[names[0]]
    other = FLAGS.compare and Transformers(first.model, first.variables, tokens_BT,
                                           FLAGS.new_tokens)
    rounds = []
    for index in range(FLAGS.rounds):
      round_ = {'round': index}
      for name in names:  # Alternating: every variant sees the same stretch of machine time.
        round_[label(name)] = rates(*decoders[name].run()[:2])
      if other:
        time.sleep(0.5)  # Lets torch's OpenMP threads stop spinning before JAX runs again.
        round_['transformers'] = rates(*other.run())
        round_['speedup'] = round(round_[label(names[0])]['decode_tokens_per_sec'] /
                                  round_['transformers']['decode_tokens_per_sec'], 2)
        time.sleep(0.5)
      print(json.dumps(round_), flush=True)
      rounds.append(round_)

  median = lambda impl: {key: statistics.median(r[impl][key] for r in rounds)
                         for key in rounds[0][impl]}
  summary = {'device': jax.devices()[0].device_kind, 'num_devices': jax.device_count(),
             'batch': FLAGS.batch, 'prompt_len': FLAGS.prompt_len,
             'new_tokens': FLAGS.new_tokens,
             'params': sum(x.size for x in jax.tree.leaves(first.variables['params']))}
  for name in names:
    decoder = decoders[name]
    bytes_per_step = step_bytes(decoder.model.cfg, decoder.variables, decoder.cache)
    bandwidth = flops.memory_bandwidth_per_device(bytes_per_step)
    step_s = median(label(name))['ms_per_decode_step'] / 1000
    summary[label(name)] = {
        **median(label(name)), 'dtype': decoder.model.cfg.dtype,
        'quant': quant.weight_fields(decoder.model.cfg.quant) | {
            'activations': decoder.model.cfg.quant.activations,
            'kv_cache': decoder.model.cfg.quant.kv_cache},
        'bytes_per_decode_step': bytes_per_step,
        'cache_bytes_per_token': cache_bytes_per_token(decoder.cache, FLAGS.batch),
        'decode_bytes_per_sec_per_device': round(bytes_per_step / jax.device_count() / step_s),
        'memory_bandwidth_per_device': bandwidth and round(bandwidth),
        'bandwidth_utilisation': bandwidth and round(
            bytes_per_step / jax.device_count() / step_s / bandwidth, 3)}
    if name != names[0]:
      summary[label(name)]['speedup_over_' + label(names[0])] = statistics.median(
          r[label(name)]['decode_tokens_per_sec'] / r[label(names[0])]['decode_tokens_per_sec']
          for r in rounds)
  if other:
    summary.update(transformers=median('transformers'),
                   speedup=statistics.median(r['speedup'] for r in rounds),
                   same_greedy_tokens=bool((first.tokens_BC == other.tokens_BC).all()))
  print(json.dumps(summary), flush=True)


if __name__ == '__main__':
  cli.run(main)
