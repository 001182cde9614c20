"""What int8 costs in quality: every config.quant scheme of a trained run, on its eval split.

  python scripts/quant_quality.py --config=configs/stdlib_tiny.py --workdir=/tmp/stdlib_tiny \
      [--batches=32] [--out=table.md]

For each scheme (SCHEMES: f32, bf16 compute, int8 weights per channel / per tensor / group-wise,
W8A8 per token x per channel and per tensor) the eval loss, perplexity and bits per byte of the
whole-sequence forward pass, and the loss scored through the KV cache with the cache in float and
in int8: the first token prefilled, every later one decoded teacher-forced, so each prediction
reads the cached keys and values (with a float cache in f32 it equals the forward pass, which the
script checks). Prints a markdown table with the change in perplexity against f32.
"""
import dataclasses
import math

from absl import app, flags
from etils import epath
import jax
import jax.numpy as jnp

from lepton_jax import cli, data, quant, sample, sharding, steps
from lepton_jax.evals import language_model
from lepton_jax.model import attention
from lepton_jax.model.config import QuantConfig

flags.DEFINE_integer('batches', 32, 'Eval batches (of config.batch_size x config.seq_len).',
                     lower_bound=1)
flags.DEFINE_string('out', None, 'Also write the table to this markdown file.')

W8 = QuantConfig(weights='int8')
SCHEMES = {  # name: (compute dtype, quant)
    'f32': ('float32', QuantConfig()),
    'bf16': ('bfloat16', QuantConfig()),
    'W8 per channel': ('float32', W8),
    'W8 per tensor': ('float32', dataclasses.replace(W8, granularity='tensor')),
    'W8 group 64': ('float32', dataclasses.replace(W8, granularity='group', group_size=64)),
    'W8A8 per token x channel': ('float32', dataclasses.replace(W8, activations='int8')),
    'W8A8 per tensor': ('float32', dataclasses.replace(
        W8, granularity='tensor', activations='int8', activation_granularity='tensor')),
}


def cached_loss_sum(model, variables, inputs_BT: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Summed next-token loss with every prediction after the first read through the KV cache."""
  batch, length = inputs_BT.shape
  logits_B1V, mutated = model.apply(variables, inputs_BT[:, :1],
                                    cache=attention.Prefill(jnp.ones(batch, jnp.int32), length),
                                    mutable=['cache'])

  def step(cache, t):
    logits_B1V, mutated = model.apply(
        {**variables, 'cache': cache}, jax.lax.dynamic_slice_in_dim(inputs_BT, t, 1, axis=1),
        jnp.full((batch, 1), t), cache=attention.Decode(), mutable=['cache'])
    return mutated['cache'], logits_B1V[:, 0]

  _, logits_TBV = jax.lax.scan(step, mutated['cache'], jnp.arange(1, length))
  logits_BTV = jnp.concatenate([logits_B1V, logits_TBV.transpose(1, 0, 2)], axis=1)
  log_probs_BTV = jax.nn.log_softmax(logits_BTV)
  return -jnp.sum(jnp.take_along_axis(log_probs_BTV, targets_BT[..., None], axis=-1))


def scores(model, variables, batches, num_bytes: int) -> dict:
  forward = jax.jit(lambda v, b: steps.eval_step(v, b, model=model))
  cached = jax.jit(lambda m, v, b: cached_loss_sum(m, v, b['inputs'], b['targets']),
                   static_argnums=0)
  sums = {'loss': 0.0, 'tokens': 0.0, 'cached': 0.0, 'cached_int8': 0.0}
  int8_cache = dataclasses.replace(model, cfg=dataclasses.replace(
      model.cfg, quant=dataclasses.replace(model.cfg.quant, kv_cache='int8')))
  for batch in batches:
    result = forward(variables, batch)
    sums['loss'] += float(result['loss_sum'])
    sums['tokens'] += float(result['tokens'])
    sums['cached'] += float(cached(model, variables, batch))
    sums['cached_int8'] += float(cached(int8_cache, variables, batch))
  loss = sums['loss'] / sums['tokens']
  return {'loss': loss, 'perplexity': math.exp(loss),
          'bits_per_byte': language_model.bits_per_byte(sums['loss'], num_bytes),
          'cached_loss': sums['cached'] / sums['tokens'],
          'cached_int8_loss': sums['cached_int8'] / sums['tokens']}


def main(argv):
  f = cli.FLAGS
  config = f.config
  with cli.command_line('quant_quality', argv):
    config.eval_batches = f.batches
    model, variables, tokenizer = sample.load(config, f.workdir)
    batches = data.make_eval_batches(config, tokenizer, 0, 1)
    for batch in batches:
      if not batch['mask'].all():
        raise ValueError('the eval split is shorter than --batches full batches; give fewer')
    num_bytes = language_model.scored_bytes(batches, tokenizer)
    mesh, rules = sharding.make_mesh(config.mesh), config.mesh.rules
    rows = {}
    with sharding.use_mesh(mesh, rules):
      for name, (dtype, quant_config) in SCHEMES.items():
        float_model = dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, dtype=dtype))
        rows[name] = scores(*quant.quantize(float_model, variables, quant_config, mesh, rules),
                            batches, num_bytes)
        gap = abs(rows[name]['cached_loss'] - rows[name]['loss'])
        if name == 'f32' and gap > 1e-4 * rows[name]['loss']:
          raise AssertionError(f'{name}: the float-cache loss {rows[name]["cached_loss"]} differs '
                               f'from the forward loss {rows[name]["loss"]}')
        print(name, rows[name], flush=True)
  base = rows['f32']['perplexity']
  change = lambda loss: f'{100 * (math.exp(loss) / base - 1):+.2f}%'
  lines = ['| scheme | eval loss | perplexity | change | bits/byte | int8 KV: perplexity | '
           'change |', '|---|---|---|---|---|---|---|']
  for name, row in rows.items():
    lines.append(f'| {name} | {row["loss"]:.4f} | {row["perplexity"]:.3f} | '
                 f'{change(row["loss"])} | {row["bits_per_byte"]:.4f} | '
                 f'{math.exp(row["cached_int8_loss"]):.3f} | {change(row["cached_int8_loss"])} |')
  tokens = int(sum(b['mask'].sum() for b in batches))
  table = '\n'.join(lines) + f'\n\n{tokens} eval tokens ({num_bytes} bytes).\n'
  print(table, flush=True)
  if f.out:
    epath.Path(f.out).write_text(table)


if __name__ == '__main__':
  cli.run(main)
