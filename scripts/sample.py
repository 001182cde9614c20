"""Sample text from a trained run: the same --config and --workdir as lepton-train.

  python scripts/sample.py --config=configs/stdlib_tiny.py --workdir=/tmp/stdlib_tiny \
      --config.sample.prompt='def ' --config.sample.num_tokens=300 [--step=400]

`config.sample` sets the prompt, length, temperature and top-k; `--samples` draws several, each
with its own seed.
"""
from absl import flags

from lepton_jax import cli, sample

flags.DEFINE_integer('step', None, 'Checkpoint step to load (default: the latest).')
flags.DEFINE_integer('samples', 1, 'How many samples to draw.')


def main(argv):
  config = cli.FLAGS.config
  with cli.command_line('sample', argv):
    model, variables, tokenizer = sample.load(config, cli.FLAGS.workdir, cli.FLAGS.step)
  for index in range(cli.FLAGS.samples):
    text = sample.sample_text(model, variables, tokenizer, config.sample.prompt,
                              config.sample.num_tokens, config.sample.temperature,
                              config.sample.top_k, config.seq_len, config.seed + index)
    print(f'--- sample {index} ---\n{text}', flush=True)


if __name__ == '__main__':
  cli.run(main)
