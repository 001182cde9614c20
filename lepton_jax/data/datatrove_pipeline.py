"""config.data.filters as DataTrove pipeline stages, for corpora larger than one machine's memory.

The in-memory filters (lepton_jax/data/filters.py) hold the whole train split. JSONL documents
too many for that go through the same filters as steps of a DataTrove pipeline, on DataTrove's
local executor (processes on this machine, a file at a time) or any other of its executors:

  1      read the documents; quality, decontaminate and pii on each (lepton's own functions in
         DataTrove steps), in their order in data.filters.steps; write the result and, for
         near_dedup, each document's MinHash signature (DataTrove's MinhashDedupSignature)
  2-4    near_dedup: DataTrove's MinHash buckets, clusters and filter keep one document of each
         cluster, the first in file order
  5-7    exact_dedup: DataTrove's exact dedup on a hash of filters.normalize(text)

so the per-document filters run before deduplication wherever steps names them. Near-duplicates
are what lepton's filter compares: word 5-grams (\\w+, case kept) banded as datasketch bands
the threshold and num_perm; DataTrove drops documents that share a band without lepton's check
of the estimated Jaccard, so it may also drop a pair just under the threshold. decontaminate
compares with its `files` and config.evals' task files (the documents are all train data: there
is no validation split to compare with). `scripts/prepare_corpus.py --executor=datatrove` runs
it; the `data` extra installs DataTrove.
"""
import json
import re

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import minhash
from datatrove.pipeline.dedup import exact_dedup
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig
from datatrove.utils.word_tokenizers import WordTokenizer
from etils import epath
import ml_collections

from lepton_jax.data import filters, pii, quality

PER_DOCUMENT = ('quality', 'decontaminate', 'pii')
HASH = HashConfig(hash_fc='sha1', precision=64)  # xxhash 4 refuses the str DataTrove gives it.


class Words(WordTokenizer):
  """The words lepton's near_dedup shingles: runs of \\w."""

  def word_tokenize(self, text: str) -> list[str]:
    return re.findall(r'\w+', text)

  def sent_tokenize(self, text: str) -> list[str]:
    return [text]

  def span_tokenize(self, text: str) -> list[tuple[int, int]]:
    return [(0, len(text))]


class Quality(BaseFilter):
  name = 'lepton quality'

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__()
    self.config = config

  def filter(self, doc: Document) -> bool | tuple[bool, str]:
    rule = quality.failed_rule(doc.text, self.config)
    return True if rule is None else (False, rule)


class Decontaminate(BaseFilter):
  """Drops (or, with action='report', counts) documents covering `threshold` of an evaluation
  document's n-grams. The index is built once per task."""
  name = 'lepton decontaminate'

  def __init__(self, eval_documents: list[str], config: ml_collections.ConfigDict):
    super().__init__()
    self.eval_documents, self.config, self._index = eval_documents, config, None

  def filter(self, doc: Document) -> bool | tuple[bool, str]:
    if self._index is None:
      self._index = filters.EvalNGrams(self.eval_documents, self.config.n, self.config.tokens)
    if not self._index.contaminates(self._index.hash(doc.text), self.config.threshold):
      return True
    self.stat_update('contaminated')
    return self.config.action == 'report' or (False, 'contaminated')


class RedactPii(PipelineStep):
  name = 'lepton pii'

  def __init__(self, allow: tuple[str, ...]):
    super().__init__()
    self.allow = allow

  def run(self, data, rank: int = 0, world_size: int = 1):
    for doc in data:
      doc.text, counts = pii.redact(doc.text, self.allow)
      for kind, count in counts.items():
        if count:
          self.stat_update(kind, value=count)
      yield doc


def normalized(doc: Document) -> bytes:
  """What exact_dedup compares (its return type tells DataTrove's hash function to take bytes)."""
  return filters.normalize(doc.text).encode('utf-8', 'surrogatepass')


def per_document_steps(data_config: ml_collections.ConfigDict) -> list[PipelineStep]:
  f = data_config.filters
  steps = {'quality': lambda: Quality(f.quality),
           'pii': lambda: RedactPii(tuple(f.pii.allow)),
           'decontaminate': lambda: Decontaminate(
               [d for path in f.decontaminate.files for d in filters.read_eval_file(path)],
               f.decontaminate)}
  return [steps[name]() for name in f.steps if name in PER_DOCUMENT]


def minhash_config(near_dedup: ml_collections.ConfigDict) -> minhash.MinhashConfig:
  """lepton's near_dedup settings in DataTrove's terms: the bands datasketch picks."""
  lsh = filters._lsh(near_dedup.threshold, near_dedup.num_perm)  # pylint: disable=protected-access
  return minhash.MinhashConfig(
      n_grams=near_dedup.ngram, num_buckets=lsh.b, hashes_per_bucket=lsh.r, seed=near_dedup.seed,
      norm_config=TextNormConfig(lowercase=False, norm_whitespace=False,
                                 remove_punctuation=False, norm_unicode_diacritics=False,
                                 norm_numbers=False),
      hash_config=HASH)


def reader(path: str) -> JsonlReader:
  """The documents ({"text": ...} lines) of a JSONL file, a folder of them or a glob."""
  path = epath.Path(path)
  if path.is_dir():
    return JsonlReader(str(path), text_key='text')
  parts = path.parts
  wild = next((i for i, part in enumerate(parts) if any(c in part for c in '*?[')), len(parts) - 1)
  return JsonlReader(str(epath.Path(*parts[:wild])), text_key='text',
                     glob_pattern=str(epath.Path(*parts[wild:])))


def stages(data_config: ml_collections.ConfigDict, input_path: str, out: str, work: str,
           tasks: int) -> list[tuple[list[PipelineStep], int]]:
  """The pipelines that clean the JSONL documents at `input_path` (see `reader`) into `out`
  (train-RANK.jsonl shards of {"text": ...}), with intermediate files under `work`: each
  stage's steps with the number of tasks it runs. Any
  DataTrove executor runs them in order (Slurm: one SlurmPipelineExecutor a stage, each
  `depends` on the one before)."""
  steps = tuple(data_config.filters.steps)
  near, exact = 'near_dedup' in steps, 'exact_dedup' in steps
  writer = lambda path: JsonlWriter(path, output_filename='train-${rank}.jsonl',
                                    compression=None, adapter=lambda self, doc: {'text': doc.text})
  first_out = f'{work}/filtered' if near or exact else out
  first = [reader(input_path), *per_document_steps(data_config)]
  folder = lambda path: JsonlReader(path, text_key='text')  # What a stage before wrote.
  pipelines = []
  data_folder = first_out
  if near:
    config = minhash_config(data_config.filters.near_dedup)
    signatures = minhash.MinhashDedupSignature(f'{work}/minhash/signatures', config=config,
                                               language=Words())
    pipelines += [([*first, writer(first_out), signatures], tasks),
                  ([minhash.MinhashDedupBuckets(f'{work}/minhash/signatures',
                                                f'{work}/minhash/buckets', config=config)],
                   config.num_buckets),
                  ([minhash.MinhashDedupCluster(f'{work}/minhash/buckets',
                                                f'{work}/minhash/remove', config=config)], 1)]
    near_out = f'{work}/near_deduped' if exact else out
    pipelines.append(([folder(first_out), minhash.MinhashDedupFilter(f'{work}/minhash/remove'),
                       writer(near_out)], tasks))
    data_folder = near_out
  else:
    pipelines.append(([*first, writer(first_out)], tasks))
  if exact:
    config = exact_dedup.ExactDedupConfig(content_getter=normalized, hash_config=HASH)
    pipelines += [([folder(data_folder),
                    exact_dedup.ExactDedupSignature(f'{work}/exact/signatures', config=config)],
                   tasks),
                  ([exact_dedup.ExactFindDedups(f'{work}/exact/signatures',
                                                f'{work}/exact/remove', config=config)], 1),
                  ([folder(data_folder),
                    exact_dedup.ExactDedupFilter(f'{work}/exact/remove', config=config),
                    writer(out)], tasks)]
  return pipelines


def run_local(data_config: ml_collections.ConfigDict, input_path: str, out: str, work: str,
              tasks: int) -> dict:
  """The stages on DataTrove's local executor, each after the one before, on at most `tasks`
  processes at once (logs under work/logs); returns the report: each stage's steps with
  DataTrove's counts and times."""
  previous, logs = None, []
  for index, (pipeline, stage_tasks) in enumerate(stages(data_config, input_path, out, work,
                                                         tasks)):
    logs.append(f'{work}/logs/stage_{index}')
    previous = LocalPipelineExecutor(pipeline=pipeline, tasks=stage_tasks,
                                     workers=min(tasks, stage_tasks), logging_dir=logs[-1],
                                     depends=previous)
  previous.run()
  return {'executor': 'datatrove local', 'steps': list(data_config.filters.steps),
          'stages': [json.loads((epath.Path(log) / 'stats.json').read_text()) for log in logs]}
