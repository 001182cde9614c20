"""Sample text from a trained run: the same --config and --workdir as lepton-train.

  python scripts/sample.py --config=configs/stdlib_tiny.py --workdir=/tmp/stdlib_tiny \
      --config.sample.prompt='def ' --config.sample.num_tokens=100 [--samples=3] [--step=400]

`config.sample` sets the prompt, length and sampling (temperature, top_k, top_p, min_p, seed);
`--samples` continues the prompt several times in one batch, sample i drawn from
fold_in(key(seed), i).
"""
from absl import flags

from lepton_jax import cli, sample, sharding

flags.DEFINE_integer('step', None, 'Checkpoint step to load (default: the latest).')
flags.DEFINE_integer('samples', 1, 'How many samples to draw.', lower_bound=1)


def main(argv):
  config = cli.FLAGS.config
  with cli.command_line('sample', argv):
    model, variables, tokenizer = sample.load(config, cli.FLAGS.workdir, cli.FLAGS.step)
    with sharding.use_mesh(sharding.make_mesh(config.mesh), config.mesh.rules):
      texts = sample.sample_texts(model, variables, tokenizer,
                                  [config.sample.prompt] * cli.FLAGS.samples,
                                  config.sample.num_tokens, **sample.settings(config.sample))
  for index, text in enumerate(texts):
    print(f'--- sample {index} ---\n{text}', flush=True)


if __name__ == '__main__':
  cli.run(main)
