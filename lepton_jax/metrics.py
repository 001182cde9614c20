"""Where numbers go: WORKDIR/metrics.jsonl, TensorBoard event files, optionally a Weights &
Biases run (config.wandb), and a progress bar.

The workdir may be local or on gs:// (etils.epath; TensorBoard through tensorboardX).
"""
import html
import json
import os
import sys
from typing import Mapping
import uuid

from etils import epath
import ml_collections
import tqdm

from lepton_jax import paths


class JsonLines:
  """A file of one JSON record per line, each with a 'step'; records are added in step order.

  A resumed run logs again the steps after its checkpoint, so opening it at `first_step` drops
  the records after that step (and a line cut short by a crash); `first_step=None` keeps every
  complete record (a timeline of all segments). Local files are appended to.
  Object stores (gs://) cannot append (gcsfs silently turns 'a' into 'w'), so there the whole
  file is written again for every record; it holds one short line per logged step.
  """

  def __init__(self, path: epath.PathLike, first_step: int | None):
    self._path = epath.Path(path)
    self._remote = paths.is_remote(path)
    existing = self._path.read_text(encoding='utf-8') if self._path.exists() else ''
    kept = [line for line in existing.splitlines()
            if (step := _logged_step(line)) is not None and
            (first_step is None or step <= first_step)]
    if _joined(kept) != existing:
      self._write(kept)
    self._remote_lines = kept  # What an object store's copy holds; unused for local files.

  def append(self, record: Mapping[str, float]) -> None:
    line = json.dumps(record)
    if self._remote:
      self._remote_lines.append(line)
      self._write(self._remote_lines)
    else:
      with self._path.open('a', encoding='utf-8') as f:
        f.write(line + '\n')

  def read(self) -> list[dict]:
    """Every record, in order."""
    lines = (self._remote_lines if self._remote else
             self._path.read_text(encoding='utf-8').splitlines())
    return [json.loads(line) for line in lines]

  def _write(self, lines: list[str]) -> None:
    paths.write_atomically(self._path, _joined(lines).encode('utf-8'))


def _joined(lines: list[str]) -> str:
  return ''.join(line + '\n' for line in lines)


def _logged_step(line: str) -> int | None:
  """The step of a record line; None for a line that is not a complete record."""
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return None


class MetricWriter:
  """Writes scalars from the coordinating process to every sink (JSONL, TensorBoard, W&B);
  every other process writes nothing. `wandb` is config.wandb (its project '' means no W&B)."""

  def __init__(self, workdir: str, first_step: int, active: bool,
               wandb: ml_collections.ConfigDict | None = None,
               run_config: ml_collections.ConfigDict | None = None):
    self._sinks = []
    if active:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      self._sinks = [JsonLinesWriter(os.path.join(workdir, 'metrics.jsonl'), first_step),
                     TensorBoardWriter(os.path.join(workdir, 'tensorboard'))]
      if wandb is not None and wandb.project:
        self._sinks.append(WandbWriter(wandb, workdir, run_config))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    for sink in self._sinks:
      sink.write(step, scalars)

  def write_text(self, step: int, tag: str, text: str) -> None:
    for sink in self._sinks:
      sink.write_text(step, tag, text)

  def close(self) -> None:
    for sink in self._sinks:
      sink.close()


class JsonLinesWriter:
  """The writer interface over WORKDIR/metrics.jsonl: one record of scalars per logged step."""

  def __init__(self, path: str, first_step: int):
    self._jsonl = JsonLines(path, first_step)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    self._jsonl.append({'step': step, **scalars})

  def write_text(self, step: int, tag: str, text: str) -> None:
    del step, tag, text  # Texts (the sample) go to the other sinks and the console.

  def close(self) -> None:
    pass


def import_tensorboardx():
  """tensorboardX without torch: it imports torch whenever torch is installed (~2 s before a
  run's first step) only to accept torch tensors, and lepton writes floats and text."""
  if 'torch' in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules['torch'] = None  # While tensorboardX imports, `import torch` raises ImportError.
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return tensorboardX


class TensorBoardWriter:

  def __init__(self, directory: str):
    self._tensorboard = import_tensorboardx().SummaryWriter(directory)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    for key, value in scalars.items():
      self._tensorboard.add_scalar(key, value, step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    self._tensorboard.add_text(tag, text, step)

  def close(self) -> None:
    self._tensorboard.close()


class WandbWriter:
  """A Weights & Biases run (the `wandb` extra). mode='offline' needs no network: the run is
  written under WORKDIR/wandb for `wandb sync` later. A resumed run goes on in the same W&B run,
  whose id WORKDIR/wandb_run_id keeps; W&B ignores the steps it already has."""

  def __init__(self, settings: ml_collections.ConfigDict, workdir: str,
               run_config: ml_collections.ConfigDict | None):
    import wandb  # pylint: disable=g-import-not-at-top  (an optional dependency)
    self._wandb = wandb
    id_file = epath.Path(workdir) / 'wandb_run_id'
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + '\n')
    self._run = wandb.init(
        project=settings.project, entity=settings.entity or None, mode=settings.mode,
        id=run_id, resume='allow', config=run_config.to_dict() if run_config else None,
        dir=None if paths.is_remote(workdir) else workdir,  # W&B writes locally only.
        settings=wandb.Settings(console='off'))  # Leaves the trainer's stdout alone.

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    self._run.log(dict(scalars), step=step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    self._run.log({tag: self._wandb.Html(f'<pre>{html.escape(text)}</pre>')}, step=step)

  def close(self) -> None:
    self._run.finish()


def progress_bar(first_step: int, total_steps: int, active: bool) -> tqdm.tqdm:
  """Steps done / total with ETA; the live loss goes in its postfix."""
  return tqdm.tqdm(initial=first_step, total=total_steps, disable=not active, unit='step',
                   dynamic_ncols=True, mininterval=1.0)
