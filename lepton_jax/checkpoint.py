"""Orbax checkpoints of a run: the train state, the data position, the frozen variables, and a
description of the model's variables to check a restart against.

A workdir holds `checkpoints/STEP/` with three items: `state` (step, trainable params, optimizer
state, rng, and the pruning masks of a pruned run; sharded arrays written by all processes), `data` (each process's data iterator
position, one JSON file per process: streaming pipelines differ per process) and `meta` (JSON:
every variable's name, shape, dtype and whether it trains). The frozen variables do not change,
so they are written once per run, to `frozen/`, not into every step; when they all came from the
run's `init_from` source (a LoRA run's base), not even once: every checkpoint's `meta` then
records the source and a fingerprint of those values, and a restore reads them from the source
again, refusing one whose fingerprint differs.

An int8 checkpoint (lepton_jax/quant.py) holds `state` (its params) and `meta` only, and its
int8 weights in `frozen/`.

`meta` lets a restart refuse a workdir that holds a different model before anything is written
to it, and lets evaluation, sampling and export restore the model's variables alone (no optimizer
state read), onto any mesh. Checkpoints written before `meta` described the variables (format 1:
the state item's params all trained) restore too.
"""
import hashlib
import json
import math
from typing import Any, Callable

from etils import epath
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lepton_jax import train_state, tree

FORMAT = 2


def describe(abstract_variables: dict, trainable_mask: dict) -> dict:
  """The `meta` of a checkpoint: name -> shape, dtype and whether it trains, for every variable."""
  trains = {'params/' + name: flag
            for name, flag in zip(tree.names(trainable_mask), jax.tree.leaves(trainable_mask))}
  spec = {name: {'shape': list(leaf.shape), 'dtype': np.dtype(leaf.dtype).name,
                 'trainable': trains.get(name, False)}
          for name, leaf in zip(tree.names(abstract_variables), jax.tree.leaves(abstract_variables))}
  return {'format': FORMAT, 'variables': spec}


def first_difference(saved: dict, wanted: dict, same_split: bool) -> str | None:
  """How the variables described by `saved` and `wanted` first differ, or None."""
  for name in sorted(saved.keys() | wanted.keys()):
    if not same_split and name.startswith(train_state.MASKS + '/'):
      continue  # Pruning masks only matter to training: the pruned kernel weights are zero.
    if name not in wanted:
      return f'{name} is in the checkpoint but not in the model'
    if name not in saved:
      return f'{name} is in the model but not in the checkpoint'
    s, w = saved[name], wanted[name]
    if (s['shape'], s['dtype']) != (w['shape'], w['dtype']):
      return (f'{name} is {s["dtype"]}{s["shape"]} in the checkpoint but {w["dtype"]}{w["shape"]} '
              'in the model')
    if same_split and s['trainable'] != w['trainable']:
      state = lambda trains: 'trainable' if trains else 'frozen'
      return (f'{name} is {state(s["trainable"])} in the checkpoint but '
              f'{state(w["trainable"])} under config.trainable')
  return None


class Checkpointer:
  """Keeps the last `keep` checkpoints of a workdir; saves asynchronously. `read_only` opens
  another run's checkpoints to read from, never changing them. `frozen_source(abstract)` loads
  frozen variables from the run's `init_from` source, for checkpoints that reference it."""

  def __init__(self, workdir: str, keep: int | None = None, read_only: bool = False,
               frozen_source: Callable[[dict], dict] | None = None):
    self._frozen_source = frozen_source
    self._manager = ocp.CheckpointManager(
        epath.Path(workdir) / 'checkpoints',
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                             read_only=read_only))
    self._frozen_dir = epath.Path(workdir) / 'frozen'

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def saved_variables(self, step: int) -> dict:
    """The `describe()` variables of checkpoint `step`, also for format-1 checkpoints."""
    return self._described(step, self._meta(step))

  def _described(self, step: int, meta: dict) -> dict:
    if meta.get('format') == FORMAT:
      return meta['variables']
    # Format 1 held the model config's shape fields; its state item's params all trained.
    params = ocp.PyTreeCheckpointHandler().metadata(self._item_dir(step, 'state')).tree['params']
    return describe({'params': params}, jax.tree.map(lambda _: True, params))['variables']

  def footprint(self, step: int) -> dict:
    """What checkpoint `step` costs: its trainable parameters, the bytes of its optimizer state
    (from orbax's metadata, nothing read) and its bytes on disk (frozen/ not counted)."""
    trainable = sum(math.prod(v['shape']) for v in self.saved_variables(step).values()
                    if v['trainable'])
    state = ocp.PyTreeCheckpointHandler().metadata(self._item_dir(step, 'state')).tree
    optimizer_bytes = sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
                          for leaf in jax.tree.leaves(state.get('opt_state')))
    return {'trainable': trainable, 'optimizer_bytes': optimizer_bytes,
            'checkpoint_bytes': _bytes_under(epath.Path(self._manager.directory) / str(step))}

  def check_compatible(self, meta: dict, same_split: bool) -> None:
    """Raises if the latest checkpoint holds other variables than `meta` describes (or, with
    `same_split`, trains other ones), naming the first that differs."""
    step = self.latest_step()
    if step is None:
      return
    difference = first_difference(self.saved_variables(step), meta['variables'], same_split)
    if difference:
      raise ValueError(f'{self._manager.directory} holds a checkpoint (step {step}) of a different '
                       f'model: {difference}; use a new --workdir or restore that config')

  def save_frozen(self, frozen: dict, source: str = '', loaded: dict | None = None) -> dict | None:
    """Writes the run's frozen variables (once, before the first step checkpoint refers to them),
    or, when every one of them is a value `loaded` from `source` (config.init_from), returns the
    reference to put in each checkpoint's meta (`frozen_from`) instead of copying them."""
    if not frozen:
      return None
    if loaded is not None and set(tree.names(frozen)) <= set(tree.names(loaded)):
      return {'source': source, 'fingerprint': fingerprint(frozen)}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(self._frozen_dir, frozen, force=True)
    checkpointer.wait_until_finished()
    return None

  def teacher_reference(self, step: int) -> dict | None:
    """Checkpoint `step`'s record of its distillation teacher (lepton_jax/distill.py), if any."""
    return self._meta(step).get('teacher')

  def frozen_reference(self, step: int) -> dict | None:
    """Checkpoint `step`'s `frozen_from` reference, if its frozen variables live in a source."""
    return self._meta(step).get('frozen_from')

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator, meta: dict,
           force: bool = False) -> bool:
    fields = {'step': state.step, 'trainable': state.trainable, 'opt_state': state.opt_state,
              'rng': state.rng, **_masks_field(state.masks)}
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(fields), data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta)), force=force)

  def save_variables(self, step: int, variables: dict, meta: dict) -> None:
    """Writes a model's variables alone as checkpoint `step`, with no optimizer state or data
    position (an int8 checkpoint): its params as the trainable ones, other collections frozen."""
    self.save_frozen({k: v for k, v in variables.items() if k != 'params'})
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({'trainable': variables['params']}),
        meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def restore(self, step: int, layout: train_state.Layout,
              data_iterator: grain.DatasetIterator | None = None,
              data_state_is_global: bool = False) -> tuple[train_state.TrainState, dict]:
    """(TrainState, frozen variables) onto `layout`'s shardings; moves `data_iterator` if given.

    With `data_state_is_global` (every process saved the same position), the run may resume
    with another number of processes than it saved with.
    """
    target = abstract_like(layout.state, layout.state_shardings)
    key = _trainable_key(self._meta(step))
    fields = {'step': target.step, key: target.trainable, 'opt_state': target.opt_state,
              'rng': target.rng, **_masks_field(target.masks)}
    saved = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(fields)))['state']
    state = train_state.TrainState(step=saved['step'], trainable=saved[key],
                                   opt_state=saved['opt_state'], rng=saved['rng'],
                                   masks=saved.get('masks'))
    if data_iterator is not None:
      data_iterator.set_state(self._data_state(step, data_state_is_global))
    return state, self._restore_frozen(abstract_like(layout.frozen, layout.frozen_shardings),
                                       self._meta(step))

  def restore_variables(self, step: int, abstract_variables: dict) -> dict:
    """The model's whole variables dict from checkpoint `step`, without its optimizer state.

    `abstract_variables` (ShapeDtypeStructs with shardings) says where each array goes; the
    checkpoint says which of them trained (any optimizer, any mesh). Pruning masks the model has
    but the checkpoint has not (a dense run, to be pruned) are left out.
    """
    meta = self._meta(step)
    saved = self._described(step, meta)
    trained = tree.map_with_names(lambda name, _: saved['params/' + name]['trainable'],
                                  abstract_variables['params'])
    trainable, frozen = train_state.split_variables(abstract_variables, trained)
    key = _trainable_key(meta)
    masks = abstract_variables.get(train_state.MASKS)
    if not any(name.startswith(train_state.MASKS + '/') for name in saved):
      masks = None
    wanted = {key: trainable, **_masks_field(masks)}
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
        partial_restore=True)))['state']
    return tree.merge({'params': restored[key]}, self._restore_frozen(frozen, meta),
                      {train_state.MASKS: restored['masks']} if masks is not None else {})

  def _restore_frozen(self, abstract_frozen: dict, meta: dict) -> dict:
    if not abstract_frozen:
      return {}
    if 'frozen_from' in meta:
      return self._frozen_from_source(abstract_frozen, meta['frozen_from'])
    if not self._frozen_dir.exists():
      raise FileNotFoundError(f'{self._frozen_dir} is missing: the checkpoints in '
                              f'{self._manager.directory} need the frozen variables saved there')
    return ocp.StandardCheckpointer().restore(self._frozen_dir, abstract_frozen)

  def _frozen_from_source(self, abstract_frozen: dict, reference: dict) -> dict:
    if self._frozen_source is None:
      raise ValueError(f'{self._manager.directory}: its frozen variables come from '
                       f'{reference["source"]!r}; give that as config.init_from')
    frozen = self._frozen_source(abstract_frozen)
    found = fingerprint(frozen)
    if found != reference['fingerprint']:
      raise ValueError(f'{self._manager.directory} was trained on a base with fingerprint '
                       f'{reference["fingerprint"]}, but config.init_from gives one with fingerprint '
                       f'{found}: restore onto the base it was trained on')
    return frozen

  def _meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def _item_dir(self, step: int, item: str) -> epath.Path:
    return epath.Path(self._manager.directory) / str(step) / item

  def _data_state(self, step: int, data_state_is_global: bool) -> dict:
    """This process's saved data position, from the file grain's handler wrote for it."""
    directory = self._item_dir(step, 'data')
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


def _bytes_under(directory: epath.Path) -> int:
  return sum(_bytes_under(path) if path.is_dir() else path.stat().length
             for path in directory.iterdir())


def _masks_field(masks: Any) -> dict:
  """The state item's `masks` entry: present only in the checkpoints of a pruned run."""
  return {'masks': masks} if masks is not None else {}


def _trainable_key(meta: dict) -> str:
  """Where the state item holds the trainable params: format 1 called them `params`."""
  return 'trainable' if meta.get('format') == FORMAT else 'params'


def abstract_like(tree_: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree_, shardings)


def fingerprint(variables: dict) -> str:
  """A short hash of every value of a tree (names, shapes, dtypes and each element's bits), the
  same on any mesh: the per-leaf sums of bit patterns are integer sums, exact in any order."""
  digest = hashlib.sha256()
  for name, leaf in zip(tree.names(variables), jax.tree.leaves(variables)):
    digest.update(f'{name}:{tuple(leaf.shape)}:{np.dtype(leaf.dtype).name};'.encode())
    digest.update(np.asarray(_bit_sums(leaf)).tobytes())
  return digest.hexdigest()[:16]


@jax.jit
def _bit_sums(x: jax.Array) -> jax.Array:
  bits_type = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  bits = jax.lax.bitcast_convert_type(x, bits_type).astype(jnp.uint32).reshape(-1)
  weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.stack([jnp.sum(bits), jnp.sum(bits * weights)])  # uint32 sums wrap: still exact.
