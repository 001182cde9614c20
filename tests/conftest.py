"""Test-process setup: 8 simulated CPU devices and a persistent XLA compilation cache.

Many tests train the same tiny model; the cache lets every run after the first skip compilation
(keys include the HLO and the jax version, so a changed model never hits a stale entry).
"""
import os
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top  (flags above must precede the first import)

jax.config.update('jax_compilation_cache_dir',
                  os.path.join(tempfile.gettempdir(), 'lepton_jax_test_xla_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
