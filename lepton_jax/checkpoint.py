"""Orbax checkpoints of the train state, the data position and what model they hold.

Each step directory holds three items: `state` (params, optimizer state, step, rng; sharded
arrays written by all processes), `data` (each process's data iterator position, one JSON file per
process: streaming pipelines differ per process) and `meta` (the model config and tokenizer vocab,
JSON). `meta` lets a restart refuse a workdir that holds a different model before anything is
written to it.
"""
import json
from typing import Any

from etils import epath
import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Keeps the last `keep` checkpoints of a workdir; saves asynchronously."""

  def __init__(self, directory: str, keep: int):
    self._manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def check_compatible(self, meta: dict[str, Any]) -> None:
    """Raises if the latest checkpoint holds a model different from `meta`."""
    step = self.latest_step()
    if step is None:
      return
    saved = self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    diffs = [f'{k}: checkpoint {saved.get(k)!r} vs config {v!r}'
             for k, v in meta.items() if saved.get(k) != v]
    if diffs:
      first = ', '.join(diffs[:3])
      raise ValueError(f'{self._manager.directory} holds a checkpoint (step {step}) of a different '
                       f'model ({first}); use a new --workdir or restore that config')

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator, meta: dict,
           force: bool = False) -> bool:
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step: int, abstract_state: Any,
              data_iterator: grain.DatasetIterator | None = None,
              data_state_is_global: bool = False) -> Any:
    """The state, restored onto `abstract_state`'s shardings; moves `data_iterator` if given.

    With `data_state_is_global` (every process saved the same position), the run may resume
    with another number of processes than it saved with.
    """
    state = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))['state']
    if data_iterator is not None:
      data_iterator.set_state(self._data_state(step, data_state_is_global))
    return state

  def _data_state(self, step: int, data_state_is_global: bool) -> dict:
    """This process's saved data position, from the file grain's handler wrote for it."""
    directory = epath.Path(self._manager.directory) / str(step) / 'data'
    count = jax.process_count()
    own = directory / f'process_{jax.process_index()}-of-{count}.json'
    saved = sorted(directory.glob('process_*.json'))
    if not own.exists() and not (data_state_is_global and saved):
      raise ValueError(f'{directory} holds the data positions of {len(saved)} processes, not '
                       f'{count}: resume a streaming run with the process count it saved with')
    return json.loads((own if own.exists() else saved[0]).read_text())

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
