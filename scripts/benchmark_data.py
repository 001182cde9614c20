"""Input pipeline throughput of any config: time to the first batch, then tokens/s per process.

Runs this process's share of the train pipeline (`data.make_train_iterator`) with nothing else
going on, so the figure is an upper bound on what the pipeline feeds the accelerators. The time to
the first batch includes loading documents, and for the in-memory pipeline tokenizing the whole
train split; with `--config.data.streaming=True` tokenizing happens as batches are read.

  python scripts/benchmark_data.py --config=configs/stdlib_tiny.py --workdir=/tmp/stdlib_tiny
  python scripts/benchmark_data.py --config=configs/stdlib_tiny.py --workdir=/tmp/stdlib_tiny \
      --config.data.streaming=True --config.data.read_threads=2
  # One host's share of a 4-host run:
  python scripts/benchmark_data.py --config=... --process_count=4 --config.batch_size=256
"""
import json
import time

from absl import flags

from lepton_jax import cli, config_lib, data

cli.define_flags()
flags.DEFINE_integer('batches', 50, 'Batches timed after the first.')
flags.DEFINE_integer('process_count', 1, 'Processes sharing each global batch (hosts).')


def main(argv):
  del argv
  config = flags.FLAGS.config
  config_lib.validate(config)
  # --workdir: where a trained tokenizer is cached.
  tokenizer = data.build_tokenizer(config.data, flags.FLAGS.workdir or '/tmp/lepton_benchmark')
  start = time.perf_counter()
  iterator = data.make_train_iterator(config, tokenizer, 0, flags.FLAGS.process_count)
  first = next(iterator)
  first_batch_seconds = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(flags.FLAGS.batches):
    next(iterator)
  seconds = time.perf_counter() - start
  local_batch_size, seq_len = first['inputs'].shape
  print(json.dumps({
      'streaming': config.data.streaming,
      'read_threads': config.data.read_threads if config.data.streaming else None,
      'source': config.data.source, 'tokenizer': config.data.tokenizer,
      'local_batch_size': local_batch_size, 'seq_len': seq_len,
      'first_batch_s': round(first_batch_seconds, 2),
      'batches_per_sec': round(flags.FLAGS.batches / seconds, 2),
      'tokens_per_sec': round(flags.FLAGS.batches * local_batch_size * seq_len / seconds, 1),
  }))


if __name__ == '__main__':
  cli.run(main)
