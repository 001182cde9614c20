"""Test-process setup: 8 simulated CPU devices and a persistent XLA compilation cache; a fake gs://.

Many tests train the same tiny model; the cache lets every run after the first skip compilation
(keys include the HLO and the jax version, so a changed model never hits a stale entry).
"""
import os
import tempfile

from etils import epath
import etils.epath.testing  # pylint: disable=unused-import  (epath.testing.mock_epath)
import pytest

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top  (flags above must precede the first import)

jax.config.update('jax_compilation_cache_dir',
                  os.path.join(tempfile.gettempdir(), 'lepton_jax_test_xla_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


@pytest.fixture
def fake_gcs(tmp_path):
  """gs://BUCKET/... paths, for etils.epath, stored under tmp_path/gcs/BUCKET/...

  With the one difference from a local disk that matters to lepton_jax: an object cannot be
  appended to, and gcsfs opens mode 'a' as 'w' (it warns and overwrites).
  """
  root = tmp_path / 'gcs'

  def local(path) -> str:  # Local paths pass through: the mock replaces every epath backend.
    path = os.fspath(path)
    return str(root / path.removeprefix('gs://')) if path.startswith('gs://') else path

  def on_local(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def open_(original, path, mode):
    if os.fspath(path).startswith('gs://'):
      mode = mode.replace('a', 'w')
    return original(local(path), mode)

  def two_paths(original, path, dst):
    return original(local(path), local(dst))

  def glob(original, pattern):
    if not os.fspath(pattern).startswith('gs://'):
      return original(pattern)
    return ['gs://' + os.path.relpath(p, root) for p in original(local(pattern))]

  with epath.testing.mock_epath(
      open=open_, exists=on_local, isdir=on_local, listdir=on_local, makedirs=on_local,
      mkdir=on_local, remove=on_local, rmtree=on_local, stat=on_local, walk=on_local,
      glob=glob, copy=two_paths, rename=two_paths, replace=two_paths):
    yield root
