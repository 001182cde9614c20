"""Clean a corpus once (config.data.filters, lepton_jax/data/filters.py) and write it as shards.

  python scripts/prepare_corpus.py --config=configs/stdlib_tiny.py --out=/data/stdlib_clean \
      --config.data.filters.steps="('exact_dedup', 'near_dedup', 'decontaminate', 'pii')"

Writes OUT/train-00000-of-0000N.jsonl ({"text": ...} a line, the cleaned train split in the
source's order, --shard_documents a shard), OUT/data_report.json (what each filter did) and
prints the summary table. OUT must be new or empty. The shards train as task records of format
text (each document an example, packed whole: data.source=jsonl, data.format=text,
data.path='OUT/train-*.jsonl'), and feed any other tool that reads JSONL.

Documents too many to hold in memory, as JSONL with a "text" field (--input: a file, a folder or
a glob), go through the same filters (the config's data.filters) as a DataTrove pipeline
(lepton_jax/data/datatrove_pipeline.py) on --tasks processes, streaming a file at a time:

  python scripts/prepare_corpus.py --config=configs/stdlib_tiny.py --out=/data/clean \
      --executor=datatrove --input='/data/raw/*.jsonl' --tasks=8 \
      --config.data.filters.steps="('near_dedup', 'pii')"

which writes OUT/train-RANK.jsonl shards, its intermediate files and DataTrove's logs under
OUT/datatrove/, and OUT/data_report.json (DataTrove's counts and times of every step).
"""
import json

from absl import flags
from etils import epath

from lepton_jax import cli, config_lib, data
from lepton_jax.data import filters

flags.DEFINE_string('out', None, 'Directory to write the shards and data_report.json to.')
flags.DEFINE_integer('shard_documents', 10_000, 'Documents per JSONL shard.', lower_bound=1)
flags.DEFINE_enum('executor', 'memory', ['memory', 'datatrove'],
                  "memory: the config's train split at once, in this process; datatrove: the "
                  '--input documents through a DataTrove pipeline on --tasks local processes.')
flags.DEFINE_string('input', None, '--executor=datatrove: JSONL documents (a "text" field): a '
                    'file, a folder or a glob.')
flags.DEFINE_integer('tasks', 4, '--executor=datatrove: tasks of its per-document stages.',
                     lower_bound=1)


def prepare(config, out: str, shard_documents: int, executor: str = 'memory',
            input_path: str | None = None, tasks: int = 4) -> dict:
  """Writes the cleaned train split of `config` (with --executor=datatrove: the documents at
  `input_path`) under `out`; returns the filters' report."""
  config_lib.validate(config)
  if not config.data.filters.steps:
    raise ValueError('config.data.filters.steps is empty: name the filters to run, e.g. '
                     "--config.data.filters.steps=\"('exact_dedup', 'near_dedup', 'pii')\"")
  out_dir = epath.Path(out)
  if out_dir.exists() and any(out_dir.iterdir()):
    raise FileExistsError(f'--out={out} is not empty; give a new directory')
  if executor == 'datatrove' and not input_path:
    raise ValueError('--executor=datatrove cleans --input: give the JSONL documents to read')
  config = filters.with_eval_files(config)
  if executor == 'datatrove':
    return prepare_with_datatrove(config, input_path, out_dir, tasks)
  documents = data.load_documents(config.data, 'train')
  out_dir.mkdir(parents=True, exist_ok=True)
  shards = -(-len(documents) // shard_documents)
  for shard in range(shards):
    lines = [json.dumps({'text': text}, ensure_ascii=False) + '\n'
             for text in documents[shard * shard_documents:(shard + 1) * shard_documents]]
    (out_dir / f'train-{shard:05d}-of-{shards:05d}.jsonl').write_text(''.join(lines))
  return filters.write_report(config.data, out)


def prepare_with_datatrove(config, input_path: str, out_dir: epath.Path, tasks: int) -> dict:
  from lepton_jax.data import datatrove_pipeline  # pylint: disable=g-import-not-at-top  (data extra)
  report = datatrove_pipeline.run_local(config.data, input_path, str(out_dir),
                                        str(out_dir / 'datatrove'), tasks)
  report['kept'] = sum(len(shard.read_text().splitlines())
                       for shard in out_dir.glob('train-*.jsonl'))
  (out_dir / filters.REPORT_FILE).write_text(json.dumps(report, indent=2))
  return report


def main(argv):
  f = cli.FLAGS
  with cli.command_line('prepare_corpus', argv, needs_workdir=False):
    if not f.out:
      raise ValueError('--out is required: the directory to write the cleaned shards to')
    report = prepare(f.config, f.out, f.shard_documents, f.executor, f.input, f.tasks)
  if f.executor == 'memory':
    print(filters.summary_table(report), flush=True)
  print(f'Wrote {report["kept"]} documents to {f.out}', flush=True)


if __name__ == '__main__':
  cli.run(main)
