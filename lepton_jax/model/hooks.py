"""Hook points: the model's named activations, which lepton_jax.interpret records and edits.

`point(module, name, x)` marks one activation of `module` under its TransformerLens name relative
to that module ('hook_z' in attention, 'ln1.hook_normalized' in a block, 'hook_embed' at the top);
`full_name` turns module path and name into TransformerLens's full name ('blocks.0.attn.hook_z').
A point sows x into the 'intermediates' collection, which is a no-op unless the apply makes that
collection mutable, and inside `session` (interpret.run_with_hooks) returns the hook function's
edit of x. Outside a session and without a mutable 'intermediates', `point` returns x untouched:
a model nobody looks into traces exactly as before.

Under nn.scan one traced body serves every layer: sown values come out stacked on the layer axis,
and a hook for layer i applies where the layer's index, the 'layer_index' collection that
interpret passes stacked like the params, equals i.
"""
import contextlib
import contextvars
import dataclasses
import re
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

INTERMEDIATES = 'intermediates'
LAYER_INDEX = 'layer_index'  # {'layers': {'index': arange(num_layers)}} under nn.scan.
_LAYER = re.compile(r'layers(?:_(\d+))?')


@dataclasses.dataclass(frozen=True)
class Session:
  keep: Callable[[str], bool]  # Full name -> whether to record it.
  fns: dict[str, Callable[[jax.Array], jax.Array]]  # Full name -> hook function.
  num_layers: int


_SESSION = contextvars.ContextVar('lepton_hook_session', default=None)


@contextlib.contextmanager
def session(keep: Callable[[str], bool], fns: dict, num_layers: int) -> Iterator[None]:
  """Hook points traced inside record the names `keep` accepts and apply `fns`."""
  token = _SESSION.set(Session(keep, dict(fns), num_layers))
  try:
    yield
  finally:
    _SESSION.reset(token)


def full_name(path: tuple[str, ...], name: str) -> str:
  """TransformerLens's name of hook point `name` of the module at `path`: 'layers_3' is
  'blocks.3', and a scanned 'layers' is 'blocks.{}', a template over the layer index."""
  parts = []
  for part in path:
    match = _LAYER.fullmatch(part)
    parts.append(part if match is None else f'blocks.{match[1]}' if match[1] else 'blocks.{}')
  return '.'.join((*parts, name))


def active(module: nn.Module) -> bool:
  """Whether hook points of `module` record or edit anything in this trace."""
  return _SESSION.get() is not None or module.is_mutable_collection(INTERMEDIATES)


def point(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
  """x as hooks edit it (x itself without any), recorded as `name` of `module` when asked."""
  session_ = _SESSION.get()
  if session_ is None and not module.is_mutable_collection(INTERMEDIATES):
    return x
  template = full_name(module.path, name)
  scanned = '{}' in template
  names = [template.format(i) for i in range(session_.num_layers)] if (
      scanned and session_ is not None) else [template]
  if session_ is not None:
    for layer, hook_name in enumerate(names):
      if hook_name in session_.fns:
        hooked = _call(session_.fns[hook_name], hook_name, x)
        x = jnp.where(_layer_index(module) == layer, hooked, x) if scanned else hooked
  if session_ is None or any(map(session_.keep, names)):
    module.sow(INTERMEDIATES, name, x, init_fn=lambda: None, reduce_fn=lambda _, value: value)
  return x


def bind(module: nn.Module) -> Callable[[str, jax.Array], jax.Array] | None:
  """`point` for `module`'s names, or None where no hook point of it is active (so that code
  which reshapes only to show a value skips that too)."""
  return (lambda name, x: point(module, name, x)) if active(module) else None


def _call(fn, name: str, x: jax.Array) -> jax.Array:
  y = fn(x)
  if getattr(y, 'shape', None) != x.shape:
    raise ValueError(f'hook {name}: returned shape {getattr(y, "shape", type(y).__name__)} for '
                     f'an activation of shape {x.shape}; a hook returns its edit of x')
  return jnp.asarray(y).astype(x.dtype)


def _layer_index(module: nn.Module) -> jax.Array:
  """This scanned layer's index: the 'layer_index' variable of the enclosing 'layers' module."""
  while module.path != ('layers',):
    module = module.parent
  if not module.has_variable(LAYER_INDEX, 'index'):
    raise ValueError("a hook on a scanned layer needs the 'layer_index' collection that "
                     'lepton_jax.interpret.run_with_hooks passes')
  return module.get_variable(LAYER_INDEX, 'index')
