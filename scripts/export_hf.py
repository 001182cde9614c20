"""Export a run as a Hugging Face model directory (config.json, safetensors, tokenizer, card).

  python scripts/export_hf.py --config=configs/stdlib_tiny.py --workdir=/tmp/stdlib_tiny \
      --out=/tmp/stdlib_tiny_hf [--step=400]

The same --config and --workdir as lepton-train; the model exports as the Hugging Face family its
config matches (stdlib_tiny: LlamaForCausalLM), or the command names the field no family has.
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` then loads it.
"""
import json

from absl import flags
from etils import epath

from lepton_jax import cli, hf, pretrained, sample

flags.DEFINE_string('out', None, 'Directory to write (must not exist or be empty).')
flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: the latest).')
flags.DEFINE_integer('max_shard_mb', hf.MAX_SHARD_BYTES >> 20,
                     'Split the safetensors into shards of at most this many MiB.', lower_bound=1)


def last_metrics(workdir: str, step: int | None) -> dict:
  """The last metrics.jsonl record with evaluation metrics at or before `step`."""
  path = epath.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return {}
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  evaluated = [r for r in records if any(k.startswith('eval/') for k in r) and
               (step is None or r['step'] <= step)]
  return evaluated[-1] if evaluated else {}


def main(argv):
  config = cli.FLAGS.config
  with cli.command_line('export_hf', argv):
    if not cli.FLAGS.out:
      raise ValueError('--out is required: the directory to write the Hugging Face model to')
    model, variables, tokenizer = sample.load(config, cli.FLAGS.workdir, cli.FLAGS.step)
    hf.save(model, variables, cli.FLAGS.out, tokenizer if tokenizer.path else None,
            run={'config': pretrained.resolve(config), 'metrics': last_metrics(cli.FLAGS.workdir, cli.FLAGS.step)},
            max_shard_bytes=cli.FLAGS.max_shard_mb << 20,
            labels=config.data.labels if model.cfg.head == 'classify' else None)
  print(f'Wrote {cli.FLAGS.out}', flush=True)


if __name__ == '__main__':
  cli.run(main)
