"""A classification task from the stdlib corpus: which top-level package is this function from.

  python scripts/stdlib_functions.py --out_dir=/tmp/stdlib_functions [--num_labels=12]

Every def / async def (methods and nested functions included) of the .py files data.source=stdlib
reads, as its source text (ast.get_source_segment, dedented, cut to --max_chars), labelled by the
first component of its file's path (`email/mime/text.py` -> `email`). Modules at the top level
(`os.py`) have no package and are left out, as are the test suites (`test/`, `*/test/`,
`*/tests/`, `test_*.py`): their functions are about testing, not the package. A text seen before
(in path order) is dropped, so no function is in both splits. The split is by file, by the same
hash as data.source=stdlib's: a file is test when stdlib's eval split with
data.val_fraction=--test_fraction holds it. The default 0.2 holds all of the default pretrained
run's eval files (its val_fraction is 0.1: hash < 0.1), and as many it trained on; 0.1 would
hold only unseen files but leaves too few functions of most packages. The --num_labels packages
with the most functions among those with --min_count in each split are kept.

Writes OUT_DIR/train.jsonl and test.jsonl ({"text", "label", "file"} records, data.format
'classification'; `file` is for audit, the loader ignores it) and labels.json (the labels, most
frequent first), and prints the counts per label and split. Deterministic.
"""
import ast
import collections
import fnmatch
import json
import pathlib
import textwrap

from absl import app, flags

from lepton_jax.data import sources

SPLITS = ('train', 'test')
TEST_PATTERNS = ('test/*', '*/test/*', '*/tests/*', 'test_*.py', '*/test_*.py')

flags.DEFINE_string('out_dir', None, 'Where train.jsonl, test.jsonl and labels.json go.')
flags.DEFINE_integer('num_labels', 12, 'How many packages to keep (the most functions first).')
flags.DEFINE_integer('min_count', 20, 'A package needs this many functions in each split.')
flags.DEFINE_float('test_fraction', 0.2, 'The share of files held out, as data.val_fraction '
                   'splits the stdlib corpus.')
flags.DEFINE_integer('max_chars', 400, 'A longer function is cut to its first this many '
                     'characters.')


def file_functions(source: str, max_chars: int) -> list[str]:
  """The source text of every function of a module (ast.walk's order), dedented and cut.

  Each text is what ast.get_source_segment(source, node, padded=True) returns (only whitespace
  precedes a def on its line), from lines split once per file: get_source_segment splits the
  whole file again for every function, which made the corpus take minutes.
  """
  lines, functions = source.splitlines(keepends=True), []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      segment = lines[node.lineno - 1:node.end_lineno]
      segment[-1] = segment[-1].encode()[:node.end_col_offset].decode()  # Offsets are in bytes.
      functions.append(textwrap.dedent(''.join(segment))[:max_chars])
  return functions


def package_files(test_fraction: float) -> dict[str, list[tuple[str, str]]]:
  """split -> (package, file text) of the corpus's package files, in path order."""
  root, files = sources.stdlib_root(), {}
  for split, stdlib_split in zip(SPLITS, sources.SPLITS):
    files[split] = []
    for path in sources.stdlib_paths(test_fraction, stdlib_split):
      relative = path.relative_to(root).as_posix()
      if '/' not in relative or any(fnmatch.fnmatch(relative, p) for p in TEST_PATTERNS):
        continue
      try:
        files[split].append((relative, path.read_bytes().decode('utf-8')))
      except UnicodeDecodeError:
        continue  # As data.source=stdlib: the test suite's deliberately mis-encoded files.
  return files


def labelled_functions(test_fraction: float, max_chars: int, num_labels: int,
                       min_count: int) -> tuple[dict[str, list[dict]], list[str]]:
  """(split -> records, labels): the records of the kept packages, each text once."""
  seen, records = set(), {}
  for split, files in package_files(test_fraction).items():
    records[split] = []
    for relative, source in files:
      try:
        functions = file_functions(source, max_chars)
      except SyntaxError:
        continue  # The corpus keeps a few deliberately invalid files (lib2to3's test data).
      for text in functions:
        if text not in seen:
          seen.add(text)
          records[split].append({'text': text, 'label': relative.split('/')[0],
                                 'file': relative})
  counts = {split: collections.Counter(r['label'] for r in rs) for split, rs in records.items()}
  eligible = [label for label in counts['train']
              if all(counts[split][label] >= min_count for split in SPLITS)]
  labels = sorted(eligible, key=lambda label: (-sum(counts[s][label] for s in SPLITS), label))
  labels = labels[:num_labels]
  return {split: [r for r in rs if r['label'] in labels] for split, rs in records.items()}, labels


def write(out_dir: str, records: dict[str, list[dict]], labels: list[str]) -> str:
  """Writes the splits and labels.json into `out_dir`; returns the table of counts."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  for split, split_records in records.items():
    with open(out / f'{split}.jsonl', 'w', encoding='utf-8') as file:
      file.writelines(json.dumps(r) + '\n' for r in split_records)
  (out / 'labels.json').write_text(json.dumps(labels))
  counts = {split: collections.Counter(r['label'] for r in rs) for split, rs in records.items()}
  rows = [f"{'label':<16}{'train':>7}{'test':>7}"]
  rows += [f"{label:<16}{counts['train'][label]:>7}{counts['test'][label]:>7}" for label in labels]
  rows.append(f"{'total':<16}{len(records['train']):>7}{len(records['test']):>7}")
  return '\n'.join(rows)


def main(argv):
  del argv
  f = flags.FLAGS
  records, labels = labelled_functions(f.test_fraction, f.max_chars, f.num_labels, f.min_count)
  if not labels:
    raise app.UsageError(f'no package has --min_count={f.min_count} functions in each split')
  print(write(f.out_dir, records, labels))


if __name__ == '__main__':
  flags.mark_flag_as_required('out_dir')
  app.run(main)
