"""The one command line: importing the library defines no flags; entry points share cli's."""
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).parent.parent

_IMPORT_EVERYTHING = """
import importlib, json, pkgutil
from absl import flags
import lepton_jax
for module in pkgutil.walk_packages(lepton_jax.__path__, 'lepton_jax.'):
  importlib.import_module(module.name)
by_module = flags.FLAGS.flags_by_module_dict()
print(json.dumps({'ours': sorted(f.name for m, fs in by_module.items() for f in fs
                                 if 'lepton_jax' in m),
                  'shared': [name for name in ('config', 'workdir', 'cpu_devices')
                             if name in flags.FLAGS]}))
"""


def test_importing_every_module_of_lepton_jax_defines_no_flags():
  result = subprocess.run([sys.executable, '-c', _IMPORT_EVERYTHING], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1]) == {'ours': [], 'shared': []}


def test_entry_points_share_the_flags_that_cli_defines():
  for script in ('scripts/sample.py', 'scripts/benchmark_train.py', 'scripts/estimate_memory.py',
                 'scripts/benchmark_data.py', '-m lepton_jax.train'):
    result = subprocess.run([sys.executable, *script.split(), '--helpfull'], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert 'lepton_jax.cli:' in result.stdout, (script, result.stderr[-2000:])
    for flag in ('--config', '--workdir', '--cpu_devices', '--coordinator_address'):
      assert flag in result.stdout, (script, flag)
