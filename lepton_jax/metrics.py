"""Where numbers go: WORKDIR/metrics.jsonl, TensorBoard event files, and a progress bar."""
import json
import os
from typing import Mapping

import tensorboardX
import tqdm


class MetricWriter:
  """Writes scalars from the coordinating process; every other process writes nothing."""

  def __init__(self, workdir: str, active: bool):
    self._active = active
    if active:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._active:
      return
    record = {'step': step, **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for key, value in record.items():
      if key != 'step':
        self._tensorboard.add_scalar(key, value, step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self._active:
      self._tensorboard.add_text(tag, text, step)

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tensorboard.close()


def progress_bar(first_step: int, total_steps: int, active: bool) -> tqdm.tqdm:
  """Steps done / total with ETA; the live loss goes in its postfix."""
  return tqdm.tqdm(initial=first_step, total=total_steps, disable=not active, unit='step',
                   dynamic_ncols=True, mininterval=1.0)
