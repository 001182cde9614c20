"""scripts/stdlib_functions.py on a fake standard library: labels by package, the split by file
(stdlib's own hash), functions as ast.get_source_segment gives them, the min-count and label
filters, and deterministic files."""
import ast
import json
import pathlib
import sys
import textwrap

from lepton_jax.data import sources

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / 'scripts'))
import stdlib_functions  # pylint: disable=g-import-not-at-top,wrong-import-position

MODULE = '''
import os

def {name}_top(x):
    """Doc."""
    return x + 1

class Box:
    def {name}_method(self, y):
        def inner():
            return y
        return inner

    async def {name}_fetch(self):
        await self.{name}_method(1)

def shared():
    return 'the same text in every file'
'''


def fake_stdlib(root: pathlib.Path) -> None:
  files = {f'{package}/mod{i}.py': MODULE.format(name=f'{package}{i}')
           for package, count in (('alpha', 12), ('beta', 8), ('gamma', 6)) for i in range(count)}
  files.update({
      'tiny/only.py': 'def lonely():\n    pass\n',  # Too few functions in each split.
      'toplevel.py': 'def at_top():\n    pass\n',  # No package: left out.
      'alpha/tests/test_mod.py': 'def test_it():\n    pass\n',  # Test suites: left out.
      'test/test_alpha.py': 'def test_alpha():\n    pass\n',
      'beta/broken.py': 'def (:\n',  # Not Python: skipped.
      'site-packages/gamma/extra.py': MODULE.format(name='installed'),  # Not the stdlib.
  })
  for relative, text in files.items():
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    (root / relative).write_text(text)


def test_functions_are_labelled_by_package_and_split_by_file(tmp_path, monkeypatch):
  fake_stdlib(tmp_path / 'lib')
  monkeypatch.setattr(sources, 'stdlib_root', lambda: tmp_path / 'lib')
  records, labels = stdlib_functions.labelled_functions(
      test_fraction=0.4, max_chars=10_000, num_labels=12, min_count=2)
  assert sorted(labels) == ['alpha', 'beta', 'gamma'] and labels[0] == 'alpha'  # Most first.
  files = {split: {r['file'] for r in rs} for split, rs in records.items()}
  assert files['train'] and files['test'] and not files['train'] & files['test']
  for split, split_files in files.items():  # The split is stdlib's eval split of the same hash.
    assert all((sources.hash_fraction(f) < 0.4) == (split == 'test') for f in split_files)
  every = records['train'] + records['test']
  assert all(r['label'] == r['file'].split('/')[0] for r in every)
  assert [r['text'] for r in every].count("def shared():\n    return 'the same text in every "
                                          "file'") == 1
  first = next(r['file'] for r in every if r['file'].endswith('mod0.py'))
  source = (tmp_path / 'lib' / first).read_text()
  nodes = [n for n in ast.walk(ast.parse(source))
           if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
  expected = [textwrap.dedent(ast.get_source_segment(source, n, padded=True)) for n in nodes]
  assert len(expected) == 5 and stdlib_functions.file_functions(source, 10_000) == expected
  kept_texts = [r['text'] for r in every if r['file'] == first]  # `shared` only once overall.
  assert kept_texts in (expected, [t for t in expected if not t.startswith('def shared')])
  assert all(len(t) <= 30 for t in stdlib_functions.file_functions(source, 30))

  kept, top = stdlib_functions.labelled_functions(0.4, 10_000, num_labels=2, min_count=2)
  assert top == labels[:2] and {r['label'] for rs in kept.values() for r in rs} == set(top)
  _, strict = stdlib_functions.labelled_functions(0.4, 10_000, 12, min_count=10_000)
  assert strict == []


def test_the_files_written_are_the_same_on_every_run(tmp_path, monkeypatch):
  fake_stdlib(tmp_path / 'lib')
  monkeypatch.setattr(sources, 'stdlib_root', lambda: tmp_path / 'lib')
  written = []
  for run in ('a', 'b'):
    records, labels = stdlib_functions.labelled_functions(0.4, 10_000, 12, 2)
    table = stdlib_functions.write(str(tmp_path / run), records, labels)
    written.append({name: (tmp_path / run / name).read_bytes()
                    for name in ('train.jsonl', 'test.jsonl', 'labels.json')})
  assert written[0] == written[1]
  train = [json.loads(line) for line in written[0]['train.jsonl'].decode().splitlines()]
  assert {'text', 'label', 'file'} == set(train[0]) and len(train) == len(records['train'])
  assert json.loads(written[0]['labels.json']) == labels
  assert table.splitlines()[-1].split() == ['total', str(len(records['train'])),
                                            str(len(records['test']))]
