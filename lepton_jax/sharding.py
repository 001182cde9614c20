"""Mesh from the config, and logical axis names -> NamedShardings for any pytree.

Parameters carry logical names (see model/layers.py); `config.mesh.rules` maps each name to
mesh axes. The mesh uses Auto axis types: the model stays GSPMD-style (XLA propagates shardings
between the few `with_logical_constraint` points), which keeps the Flax linen code free of
sharding arguments.
"""
import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
Rules = Sequence[tuple[str, Any]]


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Axis sizes with a single -1 filled by the devices the other axes leave."""
  names = MESH_AXES
  sizes = [mesh_config[axis] for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {dict(zip(names, sizes))}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or num_devices % known:
      raise ValueError(f'config.mesh: {dict(zip(names, sizes))} cannot fill {num_devices} '
                       f'devices ({num_devices} is not divisible by {known})')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'config.mesh: axis sizes {dict(zip(names, sizes))} multiply to '
                     f'{math.prod(sizes)}, but there are {num_devices} devices')
  return tuple(sizes)


def hybrid_mesh_shapes(mesh_config: ml_collections.ConfigDict,
                       num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(per-slice ICI shape, across-slice DCN shape); every dcn_* size is given explicitly."""
  dcn_shape = tuple(mesh_config['dcn_' + axis] for axis in MESH_AXES)
  if min(dcn_shape) < 1:
    raise ValueError(f'config.mesh: dcn_* sizes must be given (>= 1, no -1), got '
                     f'{dict(zip(MESH_AXES, dcn_shape))}')
  num_slices = math.prod(dcn_shape)
  if num_devices % num_slices:
    raise ValueError(f'config.mesh: {num_devices} devices do not split into {num_slices} slices '
                     f'(dcn_* sizes {dict(zip(MESH_AXES, dcn_shape))})')
  return mesh_shape(mesh_config, num_devices // num_slices), dcn_shape


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The device mesh; spans TPU slices (a hybrid ICI x DCN mesh) when any dcn_* size is > 1."""
  devices = jax.devices() if devices is None else devices
  validate_rules(mesh_config.rules)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  ici_shape, dcn_shape = hybrid_mesh_shapes(mesh_config, len(devices))
  if math.prod(dcn_shape) > 1:
    device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
    return Mesh(device_array, MESH_AXES, axis_types=axis_types)
  if devices == jax.devices():
    return jax.make_mesh(ici_shape, MESH_AXES, axis_types=axis_types)
  return Mesh(np.asarray(devices).reshape(ici_shape), MESH_AXES, axis_types=axis_types)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Within: `mesh` is the current mesh and `rules` map the model's logical axis names to it."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    yield


def validate_rules(rules: Rules) -> None:
  for logical, mesh_axes in rules:
    targets = mesh_axes if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)
    for axis in targets:
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f'config.mesh.rules: logical axis {logical!r} maps to unknown mesh '
                         f'axis {axis!r}; mesh axes are {MESH_AXES}')


def logical_to_shardings(logical_specs: Any, mesh: Mesh, rules: Rules) -> Any:
  """A pytree of logical PartitionSpecs -> the same tree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def param_shardings(boxed_shapes: Any, mesh: Mesh, rules: Rules) -> Any:
  """Shardings for a tree of (abstract) `nn.LogicallyPartitioned` leaves; checks divisibility."""
  specs = nn.get_partition_spec(boxed_shapes)
  shardings = logical_to_shardings(specs, mesh, rules)
  check_divisible(unbox_abstract(boxed_shapes), shardings)
  return shardings


def unbox_abstract(boxed_shapes: Any) -> Any:
  """Strips the logical-axis boxes from `jax.eval_shape` output (no sharding constraint)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False), boxed_shapes,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def check_divisible(shapes: Any, shardings: Any) -> None:
  """Every sharded dimension must split evenly over its mesh axes; name the first that does not."""
  flat, _ = jax.tree_util.tree_flatten_with_path(shapes)
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat, flat_shardings):
    for dim, axes in zip(leaf.shape, sharding.spec):
      axes = axes if isinstance(axes, tuple) else (axes,)
      size = math.prod(sharding.mesh.shape[a] for a in axes if a is not None)
      if dim % size:
        raise ValueError(f'{jax.tree_util.keystr(path)} of shape {leaf.shape}: dimension {dim} '
                         f'is not divisible by mesh axes {axes} of size {size}')


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Batches ([B, T], or [B] per row): B split over whatever 'batch' maps to, the rest
  replicated."""
  return logical_to_shardings(P('batch'), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
  """How many ways the batch dimension is split."""
  spec = batch_sharding(mesh, rules).spec[0]
  axes = spec if isinstance(spec, tuple) else (spec,)
  return math.prod(mesh.shape[a] for a in axes if a is not None)
