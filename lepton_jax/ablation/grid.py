"""A sweep: named axes of config overrides, crossed into cells, each run at several seeds.

An axis maps labels to overrides; the first label is the baseline its deltas are measured from.
Overrides are dotted config keys, or a function of the base config that returns them (so a sweep
file can say "d_ff scaled by 2/3" for any config it is run with):

  def get_sweep(arg=None):
    return dict(
        config='configs/ablation_cpu.py',  # The default --config.
        seeds=3,                           # The default --seeds.
        axes={'mlp': {'gelu': {'model.mlp': 'gelu'},
                      'swiglu': lambda c: {'model.mlp': 'swiglu',
                                           'model.d_ff': c.model.d_ff * 2 // 3}}})

On the command line, --sweep='model.mlp=gelu,swiglu' is the axis `mlp` with one override each.
"""
import ast
import dataclasses
import importlib.util
import itertools
import re
from typing import Callable

import ml_collections

from lepton_jax import config_lib

Overrides = dict | Callable[[ml_collections.ConfigDict], dict]
Axes = dict[str, dict[str, Overrides]]  # axis -> label -> overrides, in order.
NAME = re.compile(r'[A-Za-z0-9_.+-]+')  # Axis names and labels: parts of a directory name.


@dataclasses.dataclass(frozen=True)
class Sweep:
  axes: Axes
  config: str | None = None  # The config file to run, FILE.py[:ARG].
  seeds: int | None = None


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run: a label on every axis, a seed, and the overrides they make."""
  labels: tuple[tuple[str, str], ...]  # (axis, label), in axis order.
  seed: int
  overrides: dict

  @property
  def group(self) -> str:
    """The cell's name without its seed: the runs a table row averages."""
    return ','.join(f'{axis}={label}' for axis, label in self.labels)

  @property
  def name(self) -> str:
    """Its run's directory under the sweep's workdir."""
    return ','.join([self.group, f'seed={self.seed}'] if self.labels else [f'seed={self.seed}'])


def parse_value(text: str):
  """A command-line value as --config.KEY=VALUE reads it: a Python literal, else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_axis(flag: str) -> tuple[str, dict[str, dict]]:
  """'model.mlp=swiglu,gelu' -> ('mlp', {'swiglu': {'model.mlp': 'swiglu'}, 'gelu': ...})."""
  key, _, values = flag.partition('=')
  if not key or not values:
    raise ValueError(f'--sweep={flag!r}: expected KEY=VALUE,VALUE,... or a sweep file (.py)')
  return key.rpartition('.')[2], {value: {key: parse_value(value)} for value in values.split(',')}


def load_sweep_file(spec: str) -> Sweep:
  """`get_sweep(ARG)` of a sweep file FILE.py[:ARG] (configs/sweeps/)."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('lepton_jax_sweep_file', path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except FileNotFoundError:
    raise FileNotFoundError(f'sweep file {path} does not exist') from None
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'sweep file {path} defines no get_sweep()')
  sweep = module.get_sweep(arg) if arg else module.get_sweep()
  if not isinstance(sweep, dict) or 'axes' not in sweep or set(sweep) - {'axes', 'config',
                                                                         'seeds'}:
    raise ValueError(f'sweep file {path}: get_sweep() must return a dict with axes (and '
                     f'optionally config and seeds)')
  return Sweep(**sweep)


def combine(flags: list[str]) -> Sweep:
  """The sweep of the --sweep flags: at most one sweep file, and KEY=VALUES axes added to it."""
  files = [flag for flag in flags if flag.partition(':')[0].endswith('.py')]
  if len(files) > 1:
    raise ValueError(f'--sweep: give at most one sweep file, got {files}')
  sweep = load_sweep_file(files[0]) if files else Sweep(axes={})
  axes = dict(sweep.axes)
  for flag in flags:
    if flag not in files:
      name, labels = parse_axis(flag)
      if name in axes:
        raise ValueError(f'--sweep={flag!r}: the sweep already has an axis named {name!r}')
      axes[name] = labels
  return dataclasses.replace(sweep, axes=axes)


def cells(axes: Axes, base: ml_collections.ConfigDict, seeds: int) -> list[Cell]:
  """Every combination of one label per axis, at config.seed + 0, 1, ... (innermost), each
  checked against `base`: a key that names no field or a value config_lib.validate refuses is an
  error before anything runs."""
  for axis, labels in axes.items():
    for name in (axis, *labels):
      if not NAME.fullmatch(name):
        raise ValueError(f'sweep axis {axis!r}: {name!r} may only hold letters, digits and _.+-')
  grid = []
  for combination in itertools.product(*[list(labels.items()) for labels in axes.values()]):
    overrides = {}
    for _, change in combination:
      overrides.update(change(base) if callable(change) else change)
    labels = tuple((axis, label) for axis, (label, _) in zip(axes, combination))
    for seed in range(base.seed, base.seed + seeds):
      cell = Cell(labels, seed, {**overrides, 'seed': seed})
      config_lib.validate(config_lib.override(base, cell.overrides))
      grid.append(cell)
  return grid


def shard(grid: list[Cell], spec: str) -> list[Cell]:
  """The cells of shard i of n ('i/n'): every n-th, starting at the i-th."""
  index, _, count = spec.partition('/')
  if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
    raise ValueError(f'--shard={spec!r}: expected i/n with 0 <= i < n, e.g. 0/4')
  return grid[int(index)::int(count)]
