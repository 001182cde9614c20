"""Path-pattern masks over pytrees: one mechanism for what trains, what decays, what is frozen.

A leaf's name is its path joined by '/', e.g. 'layers_0/attn/query/kernel' in a params tree or
'params/embed/embedding' in a variables dict. Patterns are regular expressions that must match a
whole name (big_vision style), so 'kernel' names no leaf and '.*/kernel' every kernel.
"""
import re
from typing import Any, Callable, Sequence

import jax
from flax import traverse_util

Patterns = Sequence[str]


def _key_name(key) -> str:
  for attribute in ('key', 'name', 'idx'):  # DictKey, GetAttrKey, SequenceKey.
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def path_name(path) -> str:
  """A jax key path as 'a/b/c'."""
  return '/'.join(_key_name(key) for key in path)


def map_with_names(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """`fn(name, leaf)` over every leaf."""
  return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(path_name(path), leaf), tree)


def names(tree: Any) -> list[str]:
  return [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def matches(patterns: Patterns, name: str) -> bool:
  return any(re.fullmatch(pattern, name) for pattern in patterns)


def mask(tree: Any, patterns: Patterns, what: str | None = None) -> Any:
  """True at the leaves whose name a pattern matches.

  With `what` (the config key the patterns come from), a pattern that matches no leaf is an
  error naming it: a typo would otherwise silently select nothing.
  """
  if what is not None:
    leaf_names = names(tree)
    for pattern in patterns:
      if not any(matches((pattern,), name) for name in leaf_names):
        example = f'names look like {leaf_names[0]!r}' if leaf_names else 'there are none'
        raise ValueError(f'{what}: pattern {pattern!r} matches no parameter; {example}')
  return map_with_names(lambda name, _: matches(patterns, name), tree)


def partition(tree: dict, selected: dict) -> tuple[dict, dict]:
  """Nested dict -> (the leaves where `selected` is True, the others), each a nested dict.

  Subtrees left empty are dropped, so an all-True mask gives (tree, {}).
  """
  flat, flat_selected = traverse_util.flatten_dict(tree), traverse_util.flatten_dict(selected)
  chosen = {k: v for k, v in flat.items() if flat_selected[k]}
  rest = {k: v for k, v in flat.items() if not flat_selected[k]}
  return traverse_util.unflatten_dict(chosen), traverse_util.unflatten_dict(rest)


def select(tree: dict, like: dict) -> dict:
  """The leaves of `tree` whose paths are leaves of `like` too (a nested dict shaped like it)."""
  wanted = set(traverse_util.flatten_dict(like))
  return traverse_util.unflatten_dict(
      {k: v for k, v in traverse_util.flatten_dict(tree).items() if k in wanted})


def merge(*trees: dict) -> dict:
  """The union of nested dicts with disjoint leaves (the inverse of `partition`)."""
  flat = {}
  for tree in trees:
    for key, value in traverse_util.flatten_dict(tree).items():
      if key in flat:
        raise ValueError(f'{"/".join(key)} is in more than one of the trees being merged')
      flat[key] = value
  return traverse_util.unflatten_dict(flat)
