"""Where numbers go: WORKDIR/metrics.jsonl, TensorBoard event files, and a progress bar.

The workdir may be local or on gs:// (etils.epath; TensorBoard through tensorboardX).
"""
import json
import os
from typing import Mapping

from etils import epath
import tensorboardX
import tqdm

from lepton_jax import paths


class JsonLines:
  """A file of one JSON record per line, each with a 'step'; records are added in step order.

  A resumed run logs again the steps after its checkpoint, so opening it at `first_step` drops
  the records after that step (and a line cut short by a crash). Local files are appended to.
  Object stores (gs://) cannot append (gcsfs silently turns 'a' into 'w'), so there the whole
  file is written again for every record; it holds one short line per logged step.
  """

  def __init__(self, path: epath.PathLike, first_step: int):
    self._path = epath.Path(path)
    self._remote = paths.is_remote(path)
    existing = self._path.read_text(encoding='utf-8') if self._path.exists() else ''
    kept = [line for line in existing.splitlines()
            if (step := _logged_step(line)) is not None and step <= first_step]
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
  """Writes scalars from the coordinating process; every other process writes nothing."""

  def __init__(self, workdir: str, first_step: int, active: bool):
    self._active = active
    if active:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      self._jsonl = JsonLines(os.path.join(workdir, 'metrics.jsonl'), first_step)
      self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._active:
      return
    record = {'step': step, **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.append(record)
    for key, value in record.items():
      if key != 'step':
        self._tensorboard.add_scalar(key, value, step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self._active:
      self._tensorboard.add_text(tag, text, step)

  def close(self) -> None:
    if self._active:
      self._tensorboard.close()


def progress_bar(first_step: int, total_steps: int, active: bool) -> tqdm.tqdm:
  """Steps done / total with ETA; the live loss goes in its postfix."""
  return tqdm.tqdm(initial=first_step, total=total_steps, disable=not active, unit='step',
                   dynamic_ncols=True, mininterval=1.0)
