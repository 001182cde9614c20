"""Cleaning the train split (config.data.filters): deduplication, decontamination against
evaluation data, PII redaction and quality rules, applied where documents are read.

`data.filters.steps` names the filters, run in that order on the train split's documents when
sources.load_documents reads them (so the in-memory pipeline, the streaming one and the
tokenizer's trainer all see the cleaned split); the eval split is left as it is.

  exact_dedup    documents equal after normalisation (NFC, \\r\\n -> \\n, trailing spaces of each
                 line and blank lines at both ends removed) are dropped; the first one is kept.
  near_dedup     MinHash LSH (datasketch) over word 5-grams (\\w+ runs), 256 permutations,
                 estimated Jaccard >= 0.8, as BigCode deduplicated The Stack: one document per
                 cluster is kept, the first.
  decontaminate  a train document is contaminated when its n-grams (13, as GPT-3) cover at
                 least `threshold` of some evaluation document's: the source's own eval split,
                 the task files of config.evals and any `files`; dropped, or only counted with
                 action='report'. tokens='words' (lowercased \\w+, GPT-3's) or 'code' (identifiers,
                 numbers and single punctuation marks, case kept).
  pii            e-mail and IP addresses, phone and card numbers and secrets replaced by
                 placeholders (data/pii.py, its allow-list and `allow`); nothing dropped.
  quality        Gopher's rules for prose or Codex/StarCoder's for code (data/quality.py).

Every filter counts what it dropped or changed and how fast it ran; the run logs a table of them
and training writes WORKDIR/data_report.json. The result is a pure function of the config and the
corpus, identical in every process and run, so the data position stays exact under resume. The
filters hold the split's text in memory: a corpus too large for that is cleaned once by
scripts/prepare_corpus.py in memory of its own machine, or by a distributed tool.

datasketch and detect-secrets (the `data` extra) are imported by the filters that use them.
"""
from collections.abc import Callable, Sequence
import dataclasses
import hashlib
import json
import re
import time
import unicodedata

from absl import logging
from etils import epath
import ml_collections
import numpy as np

from lepton_jax.data import pii
from lepton_jax.data import quality
from lepton_jax.data import sources

REPORT_FILE = 'data_report.json'
TOKENIZERS = {  # decontaminate.tokens -> text -> tokens
    'words': lambda text: re.findall(r'\w+', text.lower()),
    'code': lambda text: re.findall(r'\w+|[^\w\s]', text),
}
DECONTAMINATE_ACTIONS = ('drop', 'report')


def default_config() -> ml_collections.ConfigDict:
  """config.data.filters: nothing runs until `steps` names filters."""
  return ml_collections.ConfigDict(dict(
      steps=(),  # Filter names (FILTERS), applied in this order to the train split.
      near_dedup=dict(threshold=0.8, ngram=5, num_perm=256, seed=0),
      decontaminate=dict(
          n=13,
          tokens='words',  # words | code
          threshold=0.5,  # Share of an eval document's n-grams a train document must hold.
          action='drop',  # drop | report
          validation=True,  # The source's eval split.
          evals=True,  # The task files (`path`) of config.evals.
          files=(),  # Any other files: .jsonl (every string of each record) or text.
      ),
      pii=dict(allow=()),  # Strings, or regexes matching a whole finding, kept as they are.
      quality=quality.default_config(),
  ))


# The public API (tests and notebooks): each filter's core on plain lists of strings.


def redact_pii(text: str) -> tuple[str, dict[str, int]]:
  """`text` with PII and secrets replaced by placeholders (<EMAIL>, <IP_ADDRESS>, <PHONE>,
  <CREDIT_CARD>, <KEY>), everything else byte for byte; and how many of each kind."""
  return pii.redact(text)


def near_duplicates(docs: Sequence[str], threshold: float = 0.8, ngram: int = 5,
                    seed: int = 0) -> list[list[int]]:
  """Clusters of near-duplicate documents (indices, ascending; clusters by first index),
  singletons left out: MinHash LSH over word n-grams, pairs kept at estimated Jaccard >=
  threshold, clusters their connected components."""
  _check_near_dedup(threshold, ngram, 256)
  return _near_duplicates(docs, threshold, ngram, 256, seed)


def contamination(train_docs: Sequence[str], eval_docs: Sequence[str],
                  n: int = 13) -> list[float]:
  """Per evaluation document, the share of its word n-grams (GPT-3's: lowercased) found
  anywhere in training; a document shorter than n words is one n-gram; an empty one 0."""
  if n < 1:
    raise ValueError(f'n={n}: must be >= 1')
  grams = NGrams(n, 'words')
  train = np.unique(np.concatenate([grams(d) for d in train_docs] + [grams('')]))
  return [float(np.isin(e, train, assume_unique=True).mean()) if len(e) else 0.0
          for e in map(grams, eval_docs)]


# Validation: every problem before any data is read.


def validate(config: ml_collections.ConfigDict) -> None:
  """One-line ValueError / FileNotFoundError for a bad config.data.filters."""
  f = config.data.filters
  if f.steps and config.data.source == 'jsonl':
    raise ValueError("config.data.filters.steps: filters clean text documents; data.source='jsonl' "
                     'task records are not filtered (clean them before, e.g. with '
                     'scripts/prepare_corpus.py on their text)')
  for name in f.steps:
    if name not in FILTERS:
      raise ValueError(f'config.data.filters.steps: {name!r} is not a filter; expected names '
                       f'from {tuple(FILTERS)}')
  if len(set(f.steps)) != len(f.steps):
    raise ValueError(f'config.data.filters.steps={tuple(f.steps)!r} names a filter twice')
  nd, dc = f.near_dedup, f.decontaminate
  try:
    _check_near_dedup(nd.threshold, nd.ngram, nd.num_perm)
    if 'near_dedup' in f.steps:
      _lsh(nd.threshold, nd.num_perm)
  except ValueError as e:
    raise ValueError(f'config.data.filters.near_dedup.{e}') from None
  if dc.n < 1 or not 0.0 < dc.threshold <= 1.0:
    raise ValueError(f'config.data.filters.decontaminate: n={dc.n} must be >= 1 and '
                     f'threshold={dc.threshold} in (0, 1]')
  if dc.tokens not in TOKENIZERS or dc.action not in DECONTAMINATE_ACTIONS:
    raise ValueError(f'config.data.filters.decontaminate: tokens={dc.tokens!r} must be one of '
                     f'{tuple(TOKENIZERS)} and action={dc.action!r} one of '
                     f'{DECONTAMINATE_ACTIONS}')
  quality.check(f.quality)
  for allowed in f.pii.allow:
    try:
      re.compile(allowed)
    except re.error as e:
      raise ValueError(f'config.data.filters.pii.allow: {allowed!r} is not a regex ({e})') from None
  if 'decontaminate' in f.steps:
    files = eval_files(config)
    if not files and not dc.validation:
      raise ValueError('config.data.filters.decontaminate has nothing to compare with: set '
                       'validation=True, or give files (or config.evals task files)')
    for path in files:
      _check_readable(path)


def _check_near_dedup(threshold: float, ngram: int, num_perm: int) -> None:
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f'threshold={threshold}: must be in (0, 1]')
  if ngram < 1 or num_perm < 2:
    raise ValueError(f'ngram={ngram} must be >= 1 and num_perm={num_perm} >= 2')


def eval_files(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """decontaminate.files, and the task files of config.evals when decontaminate.evals."""
  dc = config.data.filters.decontaminate
  tasks = tuple(spec['path'] for spec in config.get('evals', {}).values()
                if dc.evals and spec.get('path'))
  return tuple(dc.files) + tasks


def with_eval_files(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy whose decontaminate.files also lists config.evals' task files: sources read only
  config.data, and this is what decontamination compares with."""
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.data.filters.decontaminate.files = eval_files(config)
  resolved.data.filters.decontaminate.evals = False
  return resolved


def _check_readable(path: str) -> None:
  try:
    with epath.Path(path).open('rb') as f:
      f.read(1)
  except (OSError, ValueError) as e:
    raise FileNotFoundError(f'config.data.filters.decontaminate: cannot read {path} '
                            f'({type(e).__name__}: {e})') from None


# Applying the filters.


@dataclasses.dataclass(frozen=True)
class Cleaned:
  documents: list[str]  # The train split after every filter.
  report: dict  # What each filter did (data_report.json).


_cache: dict[str, tuple[str, Cleaned]] = {}  # Config key -> (corpus digest, result): the last one.


def apply(data_config: ml_collections.ConfigDict, documents: Sequence[str]) -> Cleaned:
  """The train split's documents after data_config.filters.steps, with their report.

  The same config and corpus give the same result, computed once per process (the tokenizer's
  trainer and the pipeline both read the split).
  """
  key = json.dumps(data_config.to_dict(), sort_keys=True, default=str)
  digest = hashlib.sha256()
  for text in documents:
    digest.update(hashlib.sha256(text.encode('utf-8', 'surrogatepass')).digest())
  if key in _cache and _cache[key][0] == digest.hexdigest():
    return _cache[key][1]
  f = data_config.filters
  texts, report = list(documents), {'source': sources.describe_source(data_config),
                                    'documents': len(documents), 'steps': []}
  for name in f.steps:
    start = time.perf_counter()
    kept, step_report = FILTERS[name](texts, data_config)
    seconds = time.perf_counter() - start
    if not kept:
      raise ValueError(f'config.data.filters: {name!r} would drop all {len(texts)} documents of '
                       f'{report["source"]}; loosen its thresholds or remove it from steps')
    report['steps'].append(dict(
        name=name, documents_in=len(texts), dropped=len(texts) - len(kept), **step_report,
        seconds=round(seconds, 3), documents_per_second=round(len(texts) / max(seconds, 1e-9), 1)))
    texts = kept
  report['kept'] = len(texts)
  cleaned = Cleaned(texts, report)
  logging.info('%s', summary_table(report))
  _cache.clear()  # One corpus at a time: the split's text can be large.
  _cache[key] = (digest.hexdigest(), cleaned)
  return cleaned


def summary_table(report: dict) -> str:
  """The report as a table of lines: one row per filter."""
  rows = [f'data.filters on the train split of {report["source"]}: {report["documents"]} '
          f'documents in, {report.get("kept", "?")} kept',
          f'  {"filter":<14}{"in":>8}{"dropped":>9}{"changed":>9}{"docs/s":>10}  details']
  for step in report['steps']:
    details = ', '.join(f'{k}={v}' for k, v in step.get('details', {}).items())
    rows.append(f'  {step["name"]:<14}{step["documents_in"]:>8}{step["dropped"]:>9}'
                f'{step.get("changed", 0):>9}{step["documents_per_second"]:>10.0f}  {details}')
  return '\n'.join(rows)


def write_report(data_config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes WORKDIR/data_report.json for the train split (the same, cached, result that
  load_documents gave) and returns the report."""
  report = apply(data_config, sources.SOURCES[data_config.source](data_config, 'train')).report
  path = epath.Path(workdir) / REPORT_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(report, indent=2))
  return report


# The filters: (texts, data config) -> (kept texts, {'changed': n, 'details': {...}}).


def normalize(text: str) -> str:
  """What exact_dedup compares: NFC, \\n line ends, no trailing spaces, no blank ends."""
  text = unicodedata.normalize('NFC', text).replace('\r\n', '\n').replace('\r', '\n')
  return '\n'.join(line.rstrip() for line in text.split('\n')).strip('\n')


def _exact_dedup(texts: list[str], data_config) -> tuple[list[str], dict]:
  del data_config
  seen, kept, groups = set(), [], set()
  for text in texts:
    digest = hashlib.sha256(normalize(text).encode('utf-8', 'surrogatepass')).digest()
    if digest in seen:
      groups.add(digest)
    else:
      kept.append(text)
    seen.add(digest)
  return kept, {'details': {'clusters': len(groups)}}


def _near_dedup(texts: list[str], data_config) -> tuple[list[str], dict]:
  nd = data_config.filters.near_dedup
  clusters = _near_duplicates(texts, nd.threshold, nd.ngram, nd.num_perm, nd.seed)
  dropped = {i for cluster in clusters for i in cluster[1:]}
  return ([t for i, t in enumerate(texts) if i not in dropped],
          {'details': {'clusters': len(clusters),
                       'largest': max(map(len, clusters), default=0)}})


def _near_duplicates(docs: Sequence[str], threshold: float, ngram: int, num_perm: int,
                     seed: int) -> list[list[int]]:
  from datasketch import MinHash  # pylint: disable=g-import-not-at-top  (the data extra)
  permutations = MinHash(num_perm=num_perm, seed=seed, scheme='affine32').permutations
  lsh = _lsh(threshold, num_perm)
  signatures = {}
  for index, doc in enumerate(docs):
    shingles = word_shingles(doc, ngram)
    if shingles:  # An empty document is a near-duplicate of nothing.
      signature = MinHash(num_perm=num_perm, seed=seed, permutations=permutations,
                          scheme='affine32')
      signature.update_batch(sorted(shingles))
      signatures[index] = signature
      lsh.insert(index, signature)
  parent = list(range(len(docs)))

  def root(i: int) -> int:
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for index, signature in signatures.items():
    for other in lsh.query(signature):
      if other != index and signature.jaccard(signatures[other]) >= threshold:
        a, b = sorted((root(index), root(other)))
        parent[b] = a  # The smaller index roots its cluster: the first document is kept.
  members = {}
  for index in range(len(docs)):
    members.setdefault(root(index), []).append(index)
  return sorted(cluster for cluster in members.values() if len(cluster) > 1)


def _lsh(threshold: float, num_perm: int):
  """datasketch's index; a threshold it cannot band (too near 1 for num_perm) is a ValueError."""
  from datasketch import MinHashLSH  # pylint: disable=g-import-not-at-top  (the data extra)
  try:
    return MinHashLSH(threshold=threshold, num_perm=num_perm)
  except ValueError as e:
    raise ValueError(f'threshold={threshold} with num_perm={num_perm}: datasketch cannot band '
                     f'it ({e}); lower the threshold or raise num_perm') from None


def word_shingles(text: str, n: int) -> set[bytes]:
  """The text's n-grams of \\w+ words (the whole text when shorter), as bytes for hashing."""
  words = re.findall(r'\w+', text)
  if len(words) <= n:
    return {' '.join(words).encode()} if words else set()
  return {' '.join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


class NGrams:
  """Text -> the sorted unique 64-bit hashes of its token n-grams; tokens get ids in the order
  first seen, so hashes agree between every text one instance hashes."""

  _BASE = np.uint64(0x9E3779B97F4A7C15)  # Odd: powers of it mix positions modulo 2**64.

  def __init__(self, n: int, tokens: str):
    self._n, self._tokenize, self._ids = n, TOKENIZERS[tokens], {}
    self._powers = self._BASE ** np.arange(1, n + 1, dtype=np.uint64)

  def __call__(self, text: str) -> np.ndarray:
    tokens = self._tokenize(text)
    ids = np.fromiter((self._ids.setdefault(t, len(self._ids) + 1) for t in tokens), np.uint64,
                      len(tokens))
    if not len(ids):
      return np.zeros(0, np.uint64)
    windows = (np.lib.stride_tricks.sliding_window_view(ids, self._n) if len(ids) >= self._n
               else ids[None])
    return np.unique((windows * self._powers[:windows.shape[1]]).sum(axis=1, dtype=np.uint64))


def evaluation_documents(data_config: ml_collections.ConfigDict) -> list[str]:
  """What decontamination compares with: the source's raw eval split and the files given."""
  dc = data_config.filters.decontaminate
  documents = []
  if dc.validation:
    documents.extend(sources.SOURCES[data_config.source](data_config, 'eval'))
  for path in dc.files:
    documents.extend(read_eval_file(path))
  return documents


def read_eval_file(path: str) -> list[str]:
  """A .jsonl file: every record's strings joined by newlines, one document a record; any other
  file is one document."""
  _check_readable(path)
  text = epath.Path(path).read_text(encoding='utf-8')
  if not path.endswith('.jsonl'):
    return [text]
  documents = []
  for number, line in enumerate(text.splitlines(), start=1):
    if line.strip():
      try:
        documents.append('\n'.join(_strings(json.loads(line))))
      except json.JSONDecodeError as e:
        raise ValueError(f'{path} line {number}: not JSON ({e.msg})') from None
  return documents


def _strings(value) -> list[str]:
  if isinstance(value, str):
    return [value]
  if isinstance(value, dict):
    value = list(value.values())
  return [s for v in value for s in _strings(v)] if isinstance(value, list) else []


class EvalNGrams:
  """The evaluation documents' n-grams; `coverage(hashes)` is the share of each document's
  n-grams that a text holding `hashes` (from `hash`) covers."""

  def __init__(self, eval_documents: Sequence[str], n: int, tokens: str):
    self.hash = NGrams(n, tokens)
    self.eval_grams = [self.hash(d) for d in eval_documents]
    self._sizes = np.array([max(len(g), 1) for g in self.eval_grams])
    doc = np.repeat(np.arange(len(self.eval_grams)), [len(g) for g in self.eval_grams])
    hashes = np.concatenate(self.eval_grams + [np.zeros(0, np.uint64)])
    order = np.argsort(hashes, kind='stable')
    self._hashes, self._doc = hashes[order], doc[order]

  def coverage(self, hashes: np.ndarray) -> np.ndarray:
    # The rows of (eval n-gram, eval document) whose n-gram the text holds.
    lo = np.searchsorted(self._hashes, hashes, 'left')
    hi = np.searchsorted(self._hashes, hashes, 'right')
    lengths = hi - lo
    rows = np.arange(lengths.sum()) + np.repeat(lo - np.cumsum(lengths) + lengths, lengths)
    return np.bincount(self._doc[rows], minlength=len(self.eval_grams)) / self._sizes

  def contaminates(self, hashes: np.ndarray, threshold: float) -> bool:
    return bool(len(self.eval_grams)) and self.coverage(hashes).max() >= threshold


def _decontaminate(texts: list[str], data_config) -> tuple[list[str], dict]:
  dc = data_config.filters.decontaminate
  index = EvalNGrams(evaluation_documents(data_config), dc.n, dc.tokens)
  kept, contaminated, train_hashes = [], 0, []
  for text in texts:
    hashes = index.hash(text)
    train_hashes.append(hashes)
    if index.contaminates(hashes, dc.threshold):
      contaminated += 1
      if dc.action == 'report':
        kept.append(text)
    else:
      kept.append(text)
  train = np.unique(np.concatenate(train_hashes + [np.zeros(0, np.uint64)]))
  shares = [float(np.isin(g, train, assume_unique=True).mean()) if len(g) else 0.0
            for g in index.eval_grams]
  return kept, {'details': {
      'contaminated': contaminated, 'eval_documents': len(index.eval_grams),
      'eval_ngram_share_in_train': round(float(np.mean(shares)) if shares else 0.0, 4),
      'eval_documents_half_covered': int(sum(s >= 0.5 for s in shares))}}


def _pii(texts: list[str], data_config) -> tuple[list[str], dict]:
  allow = tuple(data_config.filters.pii.allow)
  redacted, totals, changed = [], dict.fromkeys(pii.KINDS, 0), 0
  for text in texts:
    clean, counts = pii.redact(text, allow)
    redacted.append(clean)
    changed += clean != text
    for kind, count in counts.items():
      totals[kind] += count
  return redacted, {'changed': changed, 'details': totals}


def _quality(texts: list[str], data_config) -> tuple[list[str], dict]:
  config = data_config.filters.quality
  kept, failed = [], {}
  for text in texts:
    rule = quality.failed_rule(text, config)
    if rule is None:
      kept.append(text)
    else:
      failed[rule] = failed.get(rule, 0) + 1
  return kept, {'details': dict(sorted(failed.items()), rules=config.rules)}


FILTERS: dict[str, Callable[[list[str], ml_collections.ConfigDict], tuple[list[str], dict]]] = {
    'exact_dedup': _exact_dedup,
    'near_dedup': _near_dedup,
    'decontaminate': _decontaminate,
    'pii': _pii,
    'quality': _quality,
}
