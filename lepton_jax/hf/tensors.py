"""safetensors files <-> lepton params, one slice at a time.

Reading is sharded: every array is built with `jax.make_array_from_callback`, whose callback reads
only the slice of the HF tensor a local device holds (`safe_open(...).get_slice`), so no host ever
holds a whole model. Writing gathers one HF tensor at a time and writes shards as they fill.

A lepton param (one layer of it) is a reshape of its TensorMap's view of an HF tensor: lepton's
'head_dim' axis is merged into the axis before it ([D, N, H] is the view [D, N * H]); every other
axis is a view axis.
"""
import dataclasses
import json
import math
import re

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import safetensors
import safetensors.numpy

from lepton_jax import tree
from lepton_jax.hf.family import TensorMap

INDEX = 'model.safetensors.index.json'
SINGLE = 'model.safetensors'
_LAYER = re.compile(r'layers_(\d+)/(.*)')


@dataclasses.dataclass(frozen=True)
class Param:
  """One lepton param and where its values come from."""
  name: str  # Lepton param path, e.g. 'layers_0/attn/query/kernel' or 'layers/...' (scanned).
  tensor: TensorMap
  layers: tuple[int, ...] | None  # Scanned: the layers stacked on axis 0. None: one tensor.
  layer: int  # The layer of an unscanned per-layer param (0 for the others).
  layer_shape: tuple[int, ...]  # The shape of one layer's slice.
  groups: tuple[tuple[int, ...], ...]  # For each view axis, the layer_shape axes it holds.

  def hf_name(self, layer: int) -> str:
    return self.tensor.hf_name.format(i=layer)

  def view_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(self.layer_shape[a] for a in group) for group in self.groups)


def plan_params(abstract_params: dict, logical_axes: dict, tensors: dict[str, TensorMap],
                num_layers: int) -> list[Param]:
  """A Param for every leaf of `abstract_params` (ShapeDtypeStructs) given the family's tensors."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  axes = jax.tree.leaves(logical_axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  result = []
  for (path, leaf), names in zip(flat, axes):
    name = tree.path_name(path)
    layer, scanned = 0, name.startswith('layers/')
    match = _LAYER.fullmatch(name)
    key = f'layers/{match.group(2)}' if match else name
    if match:
      layer = int(match.group(1))
    if key not in tensors:
      raise ValueError(f'the Hugging Face mapping has no tensor for lepton param {name}')
    shape, names = tuple(leaf.shape), tuple(names)
    if scanned:
      shape, names = shape[1:], names[1:]
    result.append(Param(name, tensors[key], tuple(range(num_layers)) if scanned else None, layer,
                        shape, _view_groups(names)))
  return result


def _view_groups(logical_names: tuple) -> tuple[tuple[int, ...], ...]:
  groups = []
  for axis, name in enumerate(logical_names):
    if name == 'head_dim' and groups:
      groups[-1] = groups[-1] + (axis,)
    else:
      groups.append((axis,))
  return tuple(groups)


class Checkpoint:
  """The safetensors files of a Hugging Face directory: which file holds each tensor, its shape.
  `single` names the one-file form (a PEFT adapter's is adapter_model.safetensors)."""

  def __init__(self, directory: epath.Path, single: str = SINGLE):
    self.directory = directory
    if (directory / INDEX).exists() and single == SINGLE:
      weight_map = json.loads((directory / INDEX).read_text())['weight_map']
      files = sorted(set(weight_map.values()))
    elif (directory / single).exists():
      files = [single]
    else:
      raise FileNotFoundError(f'{directory} holds neither {single} nor {INDEX}')
    self.file_of, self.shapes = {}, {}
    for file in files:
      path = directory / file
      if not path.exists():
        raise FileNotFoundError(f'{path}: a shard listed in {INDEX} is missing')
      try:
        with safetensors.safe_open(str(path), 'np') as f:
          for name in f.keys():
            self.file_of[name] = file
            self.shapes[name] = tuple(f.get_slice(name).get_shape())
      except safetensors.SafetensorError as error:
        raise ValueError(f'{path} is not a readable safetensors file (truncated?): {error}') from None

  def check(self, params: list[Param], buffers: tuple[str, ...], num_layers: int) -> None:
    """Every tensor the params need is there with the right shape, and nothing else is."""
    needed = {}
    for param in params:
      for layer in param.layers or (param.layer,):
        needed.setdefault(param.hf_name(layer), []).append((param, layer))
    for name, uses in needed.items():
      if name not in self.shapes:
        raise ValueError(f'{self.directory}: tensor {name} is missing from the safetensors files')
      hf_shape, (param, _) = self.shapes[name], uses[0]
      view = hf_shape[::-1] if param.tensor.transpose else hf_shape
      want = list(param.view_shape())
      if param.tensor.columns:  # Packed: the last axis holds every packed tensor's columns.
        want[-1] = max(p.tensor.columns[1] for p, _ in uses)
      if tuple(view) != tuple(want):
        expected = tuple(want[::-1] if param.tensor.transpose else want)
        raise ValueError(f'{self.directory / self.file_of[name]}: tensor {name} has shape '
                         f'{hf_shape} but config.json implies {expected} (lepton {param.name})')
    ignored = {b.format(i=i) for b in buffers for i in range(num_layers)}
    for name in self.shapes:
      if name not in needed and name not in ignored:
        raise ValueError(f'{self.directory / self.file_of[name]}: tensor {name} has no place in '
                         'the model config.json describes; lepton cannot express this model')

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    with safetensors.safe_open(str(self.directory / self.file_of[name]), 'np') as f:
      return f.get_slice(name)[index]


def read_slice(checkpoint: Checkpoint, param: Param, layer: int,
               index: tuple[slice, ...]) -> np.ndarray:
  """`param`'s layer `layer` at `index` (slices of its layer_shape), read from the checkpoint."""
  ranges = [s.indices(n)[:2] for s, n in zip(index, param.layer_shape)]
  view_index, box_shape, inner_index = [], [], []
  for group in param.groups:
    # A view axis holding several lepton axes is read over whole inner axes (head_dim is never
    # split by the rules, so this reads no more than needed), then cut.
    inner = math.prod(param.layer_shape[a] for a in group[1:])
    start, stop = ranges[group[0]]
    view_index.append(slice(start * inner, stop * inner))
    box_shape += [stop - start] + [param.layer_shape[a] for a in group[1:]]
    inner_index += [slice(None)] + [slice(*ranges[a]) for a in group[1:]]
  if param.tensor.columns:
    offset, last = param.tensor.columns[0], view_index[-1]
    view_index[-1] = slice(last.start + offset, last.stop + offset)
  transpose = param.tensor.transpose
  box = checkpoint.read(param.hf_name(layer), tuple(view_index[::-1] if transpose else view_index))
  return (box.T if transpose else box).reshape(box_shape)[tuple(inner_index)]


def load_array(checkpoint: Checkpoint, param: Param, shape: tuple[int, ...],
               sharding: jax.sharding.Sharding, dtype) -> jax.Array:
  """The param as a global array; each process reads only the slices its devices hold."""
  cache = {}  # Replicated slices are asked for once per device: read each once.

  def callback(index: tuple[slice, ...]) -> np.ndarray:
    key = tuple(s.indices(n) for s, n in zip(index, shape))
    if key not in cache:
      if param.layers is None:
        values = read_slice(checkpoint, param, param.layer, index)
      else:
        values = np.stack([read_slice(checkpoint, param, layer, index[1:])
                           for layer in param.layers[index[0]]])
      cache[key] = values.astype(dtype)
    return cache[key]

  return jax.make_array_from_callback(shape, sharding, callback)


def _host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  return multihost_utils.process_allgather(x, tiled=True)


def hf_tensors(params: list[Param]) -> dict[str, list]:
  """HF tensor name -> [(param, layer)] that fill it, in the order HF lists layers."""
  result = {}
  for param in params:
    for layer in param.layers or (param.layer,):
      result.setdefault(param.hf_name(layer), []).append((param, layer))
  return dict(sorted(result.items(), key=lambda item: _natural_key(item[0])))


def _natural_key(name: str) -> list:
  return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name)]


def gather_tensor(pieces: list, values: dict[str, jax.Array]) -> np.ndarray:
  """One HF tensor assembled from the lepton params that fill it (several columns when packed)."""
  views = []
  for param, layer in sorted(pieces, key=lambda piece: (piece[0].tensor.columns or (0,))[0]):
    array = values[param.name]
    array = array[layer] if param.layers is not None else array
    views.append(_host(array).reshape(param.view_shape()))
  view = np.concatenate(views, axis=-1) if len(views) > 1 else views[0]
  return np.ascontiguousarray(view.T) if pieces[0][0].tensor.transpose else view


def write(directory: epath.Path, tensors: dict[str, list], values: dict[str, jax.Array],
          max_shard_bytes: int, single: str = SINGLE) -> None:
  """Writes `single` (model.safetensors), or numbered shards and the index above
  `max_shard_bytes`."""
  sizes = {name: _nbytes(pieces, values) for name, pieces in tensors.items()}
  shards = [[]]
  for name in tensors:
    if shards[-1] and sum(sizes[n] for n in shards[-1]) + sizes[name] > max_shard_bytes:
      shards.append([])
    shards[-1].append(name)
  files = ([single] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
  for file, names in zip(files, shards):
    arrays = {name: gather_tensor(tensors[name], values) for name in names}
    if jax.process_index() == 0:
      safetensors.numpy.save_file(arrays, str(directory / file), metadata={'format': 'pt'})
  if len(files) > 1 and jax.process_index() == 0:
    weight_map = {name: file for file, names in zip(files, shards) for name in names}
    (directory / INDEX).write_text(json.dumps(
        {'metadata': {'total_size': sum(sizes.values())}, 'weight_map': weight_map}, indent=2))


def _nbytes(pieces: list, values: dict[str, jax.Array]) -> int:
  return sum(math.prod(param.layer_shape) * values[param.name].dtype.itemsize
             for param, _ in pieces)


def leaves_by_name(params: dict) -> dict[str, jax.Array]:
  return dict(zip(tree.names(params), jax.tree.leaves(params)))
