"""The counts of docs/data.md for the stdlib corpus: duplicates, validation contamination, PII.

  python scripts/corpus_stats.py [--val_fraction=0.1] > stats.json

Exact and near-duplicate clusters over both splits (with the files they hold), how many
validation files have an exact or near copy in training, the 13-gram share of each validation
file found in training (words and code tokens), and PII findings on the raw corpus by kind.
"""
import collections
import hashlib
import json
import time

from absl import app, flags

from lepton_jax.data import filters, sources

flags.DEFINE_float('val_fraction', 0.1, 'The stdlib split, as data.val_fraction.')


def stdlib_files(val_fraction: float, split: str) -> list[tuple[str, str]]:
  """(library-relative path, text) of the split's UTF-8 files, as data.source=stdlib reads them."""
  root, files = sources.stdlib_root(), []
  for path in sources.stdlib_paths(val_fraction, split):
    try:
      files.append((path.relative_to(root).as_posix(), path.read_bytes().decode('utf-8')))
    except UnicodeDecodeError:
      continue
  return files


def main(argv):
  del argv
  train = stdlib_files(flags.FLAGS.val_fraction, 'train')
  evals = stdlib_files(flags.FLAGS.val_fraction, 'eval')
  both = train + evals
  is_eval = lambda i: i >= len(train)
  stats = {'train_files': len(train), 'eval_files': len(evals)}

  groups = collections.defaultdict(list)
  for i, (_, text) in enumerate(both):
    groups[hashlib.sha256(filters.normalize(text).encode()).digest()].append(i)
  exact = sorted(g for g in groups.values() if len(g) > 1)
  start = time.perf_counter()
  near = filters.near_duplicates([text for _, text in both])
  stats['near_dedup_seconds'] = round(time.perf_counter() - start, 1)
  for name, clusters in (('exact', exact), ('near', near)):
    stats[f'{name}_clusters'] = len(clusters)
    stats[f'{name}_files_in_clusters'] = sum(map(len, clusters))
    stats[f'{name}_files_dropped'] = sum(len(c) - 1 for c in clusters)
    stats[f'{name}_eval_files_with_train_copy'] = sum(
        1 for c in clusters for i in c if is_eval(i) and any(not is_eval(j) for j in c))
    stats[f'{name}_cluster_files'] = [[both[i][0] for i in c] for c in clusters]

  for tokens in ('words', 'code'):
    grams = filters.NGrams(13, tokens)
    train_grams = {h for _, text in train for h in grams(text).tolist()}
    shares = []
    for path, text in evals:
      hashes = grams(text).tolist()
      shares.append((sum(h in train_grams for h in hashes) / len(hashes) if hashes else 0.0, path))
    shares.sort(reverse=True)
    values = [s for s, _ in shares]
    stats[f'contamination_{tokens}'] = {
        'mean': round(sum(values) / len(values), 4),
        'median': round(sorted(values)[len(values) // 2], 4),
        'files_over_0.5': sum(v >= 0.5 for v in values),
        'files_over_0.8': sum(v >= 0.8 for v in values),
        'top': [(round(s, 3), p) for s, p in shares[:15]]}

  start, totals, files_with = time.perf_counter(), collections.Counter(), collections.Counter()
  for _, text in both:
    _, counts = filters.redact_pii(text)
    totals.update(counts)
    files_with.update(kind for kind, n in counts.items() if n)
  stats['pii_seconds'] = round(time.perf_counter() - start, 1)
  stats['pii_findings'] = dict(totals)
  stats['pii_files'] = dict(files_with)
  print(json.dumps(stats, indent=1))


if __name__ == '__main__':
  app.run(main)
