"""The counts of docs/data.md for any configured source: duplicates, validation contamination, PII.

  python scripts/corpus_stats.py > stats.json        # the stdlib (configs/base.py's data)
  python scripts/corpus_stats.py --config=configs/shakespeare_char.py \
      --config.data.path=/path/to/tinyshakespeare.txt --unit=paragraph > stats.json

The config's data (--config.data.* overrides it; without --config, configs/base.py's: the
stdlib) is read as sources.load_documents reads it, raw: data.filters.steps must be empty, as
these counts are what decides which filters to name. They are made over units (--unit):

  document   each document of the source: a stdlib file, a text file's head (train) or tail
             (eval), a tfds or jsonl record.
  paragraph  each document cut at blank lines (lines of only whitespace) into blocks of the
             lines between them; for a play, a speech (the speaker's line and the verse). The
             block the head/tail cut of a text file goes through is two blocks, one per split.

Exact and near-duplicate clusters over both splits (with the units they hold), how many eval
units have an exact or near copy in training, the 13-gram share of each eval unit found in
training (words and code tokens), and PII findings by kind. Keys name the unit: `files` for the
stdlib's documents (its output is the one docs/data.md shows), `documents` or `paragraphs`
otherwise. A unit is named by its file (the stdlib's library-relative path, a text file's path
under the files' common directory, `tfds_name/split[index]`, jsonl `split[index]`) and, for a
paragraph or a text file's tail, `:LINE`, the line of the file it starts on.
"""
import collections
import hashlib
import json
import os
import time

from absl import app, flags
import ml_collections

from lepton_jax import cli, config_lib
from lepton_jax.data import filters, sources

flags.DEFINE_enum('unit', 'document', ('document', 'paragraph'),
                  'What the counts count: whole documents or their blank-line-separated blocks.')

Document = tuple[str, str, int]  # (name, text, the line of its file it starts on)


def stdlib_files(data_config: ml_collections.ConfigDict, split: str) -> list[Document]:
  """The split's UTF-8 files by library-relative path, as data.source=stdlib reads them."""
  root, files = sources.stdlib_root(), []
  for path in sources.stdlib_paths(data_config.val_fraction, split, data_config.include,
                                   data_config.exclude):
    try:
      files.append((path.relative_to(root).as_posix(), path.read_bytes().decode('utf-8'), 1))
    except UnicodeDecodeError:
      continue
  return files


def split_documents(data_config: ml_collections.ConfigDict, split: str) -> list[Document]:
  """The documents of `split` ('train' or 'eval') of the configured source, named."""
  if data_config.source == 'stdlib':
    return stdlib_files(data_config, split)
  documents = sources.load_documents(data_config, split)
  if data_config.source == 'text':  # One document per matching file, in matching_files' order.
    files = sources.matching_files(data_config.path)
    root = os.path.dirname(os.path.commonprefix(files))
    names = [os.path.relpath(f, root) if root else f for f in files]
    heads = documents if split == 'train' else sources.load_documents(data_config, 'train')
    first_lines = [1] * len(files) if split == 'train' else [h.count('\n') + 1 for h in heads]
    return list(zip(names, documents, first_lines))
  if data_config.source == 'tfds':
    name = data_config.tfds_name + '/' + (
        data_config.train_split if split == 'train' else data_config.eval_split)
  else:
    name = split
  return [(f'{name}[{i}]', text, 1) for i, text in enumerate(documents)]


def paragraphs(text: str) -> list[tuple[int, str]]:
  """(line offset in `text`, block) of each run of lines that are not blank."""
  blocks, start, lines = [], None, text.split('\n')
  for number, line in enumerate(lines + ['']):
    if line.strip() and start is None:
      start = number
    elif not line.strip() and start is not None:
      blocks.append((start, '\n'.join(lines[start:number])))
      start = None
  return blocks


def units(documents: list[Document], unit: str) -> list[tuple[str, str]]:
  """(name, text) of each unit of the documents."""
  if unit == 'document':
    return [(name if line == 1 else f'{name}:{line}', text) for name, text, line in documents]
  return [(f'{name}:{line + offset}', block) for name, text, line in documents
          for offset, block in paragraphs(text)]


def corpus_stats(config: ml_collections.ConfigDict, unit: str) -> dict:
  """The counts (module docstring) of config.data's train and eval splits."""
  if config.data.filters.steps:
    raise ValueError(f'config.data.filters.steps={tuple(config.data.filters.steps)!r}: '
                     'corpus_stats counts the raw corpus; leave the steps empty')
  noun = 'files' if config.data.source == 'stdlib' and unit == 'document' else f'{unit}s'
  train = units(split_documents(config.data, 'train'), unit)
  evals = units(split_documents(config.data, 'eval'), unit)
  if not evals:
    raise ValueError(f'{sources.describe_source(config.data)} has no {noun} in its eval split')
  both = train + evals
  is_eval = lambda i: i >= len(train)
  stats = {f'train_{noun}': len(train), f'eval_{noun}': len(evals)}

  groups = collections.defaultdict(list)
  for i, (_, text) in enumerate(both):
    groups[hashlib.sha256(filters.normalize(text).encode()).digest()].append(i)
  exact = sorted(g for g in groups.values() if len(g) > 1)
  start = time.perf_counter()
  near = filters.near_duplicates([text for _, text in both])
  stats['near_dedup_seconds'] = round(time.perf_counter() - start, 1)
  for name, clusters in (('exact', exact), ('near', near)):
    stats[f'{name}_clusters'] = len(clusters)
    stats[f'{name}_{noun}_in_clusters'] = sum(map(len, clusters))
    stats[f'{name}_{noun}_dropped'] = sum(len(c) - 1 for c in clusters)
    stats[f'{name}_eval_{noun}_with_train_copy'] = sum(
        1 for c in clusters for i in c if is_eval(i) and any(not is_eval(j) for j in c))
    stats[f'{name}_cluster_{noun}'] = [[both[i][0] for i in c] for c in clusters]
    if unit == 'paragraph':  # What is repeated: the start of each cluster's first paragraph.
      stats[f'{name}_cluster_texts'] = [both[c[0]][1][:80] for c in clusters]

  for tokens in ('words', 'code'):
    grams = filters.NGrams(13, tokens)
    train_grams = {h for _, text in train for h in grams(text).tolist()}
    shares = []
    for name, text in evals:
      hashes = grams(text).tolist()
      shares.append((sum(h in train_grams for h in hashes) / len(hashes) if hashes else 0.0, name))
    shares.sort(reverse=True)
    values = [s for s, _ in shares]
    stats[f'contamination_{tokens}'] = {
        'mean': round(sum(values) / len(values), 4),
        'median': round(sorted(values)[len(values) // 2], 4),
        f'{noun}_over_0.5': sum(v >= 0.5 for v in values),
        f'{noun}_over_0.8': sum(v >= 0.8 for v in values),
        'top': [(round(s, 3), p) for s, p in shares[:15]]}

  start, totals, with_kind = time.perf_counter(), collections.Counter(), collections.Counter()
  for _, text in both:
    _, counts = filters.redact_pii(text)
    totals.update(counts)
    with_kind.update(kind for kind, n in counts.items() if n)
  stats['pii_seconds'] = round(time.perf_counter() - start, 1)
  stats['pii_findings'] = dict(totals)
  stats[f'pii_{noun}'] = dict(with_kind)
  return stats


def main(argv):
  with cli.command_line('corpus_stats', argv, needs_workdir=False):
    config = cli.FLAGS.config or config_lib.base_config()
    config_lib.validate(config)
    stats = corpus_stats(config, cli.FLAGS.unit)
  print(json.dumps(stats, indent=1))


if __name__ == '__main__':
  cli.define_flags()  # --config is optional here: configs/base.py's data, the stdlib, without it.
  app.run(main, flags_parser=cli.parse_flags)
