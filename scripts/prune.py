"""One-shot pruning of a trained run into a new checkpoint (lepton_jax/prune.py).

  python scripts/prune.py --config=configs/stdlib_tiny.py --workdir=/tmp/stdlib_tiny \
      --out=/tmp/stdlib_tiny_2of4 --config.prune.method=n:m --config.prune.n=2 --config.prune.m=4
  python scripts/prune.py ... --out=/tmp/half_ffn --config.prune.method=ffn \
      --config.prune.sparsity=0.5 [--config.prune.importance=taylor]

The source is never modified. magnitude and n:m write the same model with the pruned weights
zero; heads and ffn write the smaller model (OUT/config.json has its num_heads or d_ff). OUT
loads like a run's workdir, its model and tokenizer coming from OUT itself:

  lepton-eval --config=configs/stdlib_tiny.py --workdir=/tmp/half_ffn
  python scripts/export_hf.py --config=configs/stdlib_tiny.py --workdir=/tmp/half_ffn --out=HF

and fine-tunes with --config.init_from=workdir:OUT (a config that sets num_heads, num_kv_heads
or d_ff must set the pruned value; a masked method needs the same --config.prune.*, so that the
first step finds the same masks, the zeros, and keeps them).
A run that lepton-train pruned with heads or ffn (gradual or one_shot: masked units, zero) comes
out smaller the same way, given its config.prune: the units it zeroed are the ones removed.
Prints the parameters and non-zero weights before and after.
"""
from absl import flags
import jax

from lepton_jax import cli, data, prune, sample, sharding
from lepton_jax.model.config import PruneConfig

flags.DEFINE_string('out', None, 'Directory to write the pruned checkpoint to (new or empty).')
flags.DEFINE_integer('step', None, 'Checkpoint step of the --workdir run (default: the latest).')


def main(argv):
  f = cli.FLAGS
  config = f.config
  with cli.command_line('prune', argv):
    if not f.out:
      raise ValueError('--out is required: the directory to write the pruned checkpoint to')
    prune_config = PruneConfig.from_config(config.prune)
    if prune_config.method == 'none':
      raise ValueError("config.prune.method='none' prunes nothing: give --config.prune.method="
                       'magnitude, n:m, heads or ffn (and --config.prune.* for its settings)')
    prune_config.check()
    model, variables, tokenizer = sample.load(config, f.workdir, f.step)
    grads = None
    if prune_config.importance == 'taylor' and prune_config.structured:
      batches = data.make_train_iterator(config, tokenizer, jax.process_index(),
                                         jax.process_count())
      grads = prune.loss_gradients(model, variables, [
          next(batches) for _ in range(prune_config.importance_batches)])
    pruned_model, pruned = prune.prune(model, variables, prune_config, grads)
    source = f'workdir:{f.workdir}' + (f':{f.step}' if f.step is not None else '')
    with sharding.use_mesh(sharding.make_mesh(config.mesh), config.mesh.rules):
      prune.save(f.out, config, pruned_model, pruned, tokenizer.path or '', source)
  if jax.process_index() == 0:
    for name, params in (('before', variables['params']), ('after', pruned['params'])):
      size = sum(leaf.size for leaf in jax.tree.leaves(params))
      print(f'{name}: {size} parameters, {prune.nonzero_count(params)} non-zero', flush=True)
    print(f'Wrote {f.out}', flush=True)


if __name__ == '__main__':
  cli.run(main)
