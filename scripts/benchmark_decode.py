"""Decode speed of any config: prefill and decode tokens/s, ms per decode step, and how close a
step runs to the memory-bound limit; with --compare=transformers, against Hugging Face
transformers' `generate` on the same model, in the same run.

  python scripts/benchmark_decode.py --config=configs/stdlib_tiny.py \
      --config.model.vocab_size=1024 [--batch=8] [--prompt_len=32] [--new_tokens=64] \
      [--rounds=5] [--compare=transformers] [--cpu_devices=2 --config.mesh.tensor=2]

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

from lepton_jax import cli, config_lib, flops, generate, sharding, train_state
from lepton_jax.model import ModelConfig, Transformer

cli.define_flags()
flags.DEFINE_integer('batch', 8, 'Prompts decoded together.', lower_bound=1)
flags.DEFINE_integer('prompt_len', 32, 'Tokens of every prompt.', lower_bound=1)
flags.DEFINE_integer('new_tokens', 64, 'Tokens drawn per prompt.', lower_bound=2)
flags.DEFINE_integer('rounds', 5, 'Timed rounds; medians are reported.', lower_bound=1)
flags.DEFINE_enum('compare', None, ['transformers'], 'Also time this implementation.')
FLAGS = flags.FLAGS


def step_bytes(cfg: ModelConfig, variables: dict, cache: dict) -> int:
  """Bytes a decode step reads: the weights, tables a row per token aside, and the whole cache."""
  params = variables['params']
  tables = [] if cfg.tie_embeddings else [params['embed']['embedding']]
  tables += [params['pos_embedding']] if 'pos_embedding' in params else []
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  return nbytes(params) - nbytes(tables) + nbytes(cache)


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


def main(argv):
  del argv
  cli.initialize_distributed()
  config = FLAGS.config
  config_lib.validate(config)
  if not config.model.vocab_size:
    raise ValueError('config.model.vocab_size=0 would need a tokenizer: give the vocabulary '
                     'size, e.g. --config.model.vocab_size=8192')
  cfg = ModelConfig.from_config(config.model)
  generate.check_prompts(cfg, [[0] * FLAGS.prompt_len], FLAGS.new_tokens)
  model = Transformer(cfg)
  mesh, rules = sharding.make_mesh(config.mesh), config.mesh.rules
  with sharding.use_mesh(mesh, rules):
    if FLAGS.batch % generate.batch_multiple():
      raise ValueError(f'--batch={FLAGS.batch} does not split over the mesh\'s '
                       f'{generate.batch_multiple()} batch shards')
    shardings = train_state.abstract_variables(model, mesh, rules, FLAGS.prompt_len)[1]
    variables = jax.jit(lambda: nn.unbox(model.init(jax.random.key(config.seed),
                                                    jnp.zeros((1, 8), jnp.int32))),
                        out_shardings=shardings)()
    tokens_BT = np.random.default_rng(config.seed).integers(
        0, cfg.vocab_size, (FLAGS.batch, FLAGS.prompt_len)).astype(np.int32)
    lepton = Lepton(model, variables, tokens_BT, FLAGS.new_tokens)
    other = FLAGS.compare and Transformers(model, variables, tokens_BT,
                                           FLAGS.new_tokens)
    bytes_per_step = step_bytes(cfg, variables, lepton.cache)
    bandwidth = flops.memory_bandwidth_per_device(bytes_per_step)
    rounds = []
    for index in range(FLAGS.rounds):
      round_ = {'round': index, 'lepton_jax': rates(*lepton.run()[:2])}
      if other:
        time.sleep(0.5)  # Lets torch's OpenMP threads stop spinning before JAX runs again.
        round_['transformers'] = rates(*other.run())
        round_['speedup'] = round(round_['lepton_jax']['decode_tokens_per_sec'] /
                                  round_['transformers']['decode_tokens_per_sec'], 2)
        time.sleep(0.5)
      print(json.dumps(round_), flush=True)
      rounds.append(round_)

  median = lambda impl: {key: statistics.median(r[impl][key] for r in rounds)
                         for key in rounds[0][impl]}
  step_s = median('lepton_jax')['ms_per_decode_step'] / 1000
  summary = {
      'device': jax.devices()[0].device_kind, 'num_devices': jax.device_count(),
      'batch': FLAGS.batch, 'prompt_len': FLAGS.prompt_len, 'new_tokens': FLAGS.new_tokens,
      'params': sum(x.size for x in jax.tree.leaves(variables['params'])),
      'dtype': cfg.dtype, 'lepton_jax': median('lepton_jax'),
      'bytes_per_decode_step': bytes_per_step,
      'decode_bytes_per_sec_per_device': round(bytes_per_step / jax.device_count() / step_s),
      'memory_bandwidth_per_device': bandwidth and round(bandwidth),
      'bandwidth_utilisation': bandwidth and round(
          bytes_per_step / jax.device_count() / step_s / bandwidth, 3)}
  if other:
    summary.update(transformers=median('transformers'),
                   speedup=statistics.median(r['speedup'] for r in rounds),
                   same_greedy_tokens=bool((lepton.tokens_BC == other.tokens_BC).all()))
  print(json.dumps(summary), flush=True)


if __name__ == '__main__':
  cli.run(main)
