"""scripts/estimate_memory.py on a mesh larger than the test process, and the collective counts."""
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P
import numpy as np

from lepton_jax import config_lib
from lepton_jax.model import ModelConfig, Transformer

REPO = pathlib.Path(__file__).parent.parent
sys.path.insert(0, str(REPO / 'scripts'))
import collectives  # pylint: disable=g-import-not-at-top,wrong-import-position


def report_bytes(output: str) -> dict[str, int]:
  """The 'per device' table of the script's output: row name -> bytes."""
  rows = {}
  for line in output.splitlines():
    *name, size, _ = line.split() or ['']
    if size.replace(',', '').isdigit():
      rows[' '.join(name)] = int(size.replace(',', ''))
  return rows


def test_fsdp_over_16_simulated_devices_holds_a_sixteenth_of_the_params():
  overrides = ['--config.data.tokenizer=bytes', '--config.model.vocab_size=272',
               '--config.model.scan_layers=True', '--config.batch_size=16',
               '--config.mesh.data=1', '--config.mesh.fsdp=16']
  result = subprocess.run(
      [sys.executable, 'scripts/estimate_memory.py', '--config=configs/stdlib_tiny.py',
       *overrides, '--collectives'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'data=1 x fsdp=16 x tensor=1 (16 cpu devices)' in result.stdout

  model_config = config_lib.base_config().model
  model_config.update(vocab_size=272, d_model=192, num_layers=4, num_heads=6, num_kv_heads=2,
                      head_dim=32, d_ff=512, scan_layers=True)
  params = jax.eval_shape(Transformer(ModelConfig.from_config(model_config)).init,
                          jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  num_params = sum(x.size for x in jax.tree.leaves(params))
  rows = report_bytes(result.stdout)
  assert rows['trainable params'] == 4 * num_params // 16 and rows['frozen variables'] == 0
  # AdamW's two moments, sharded like the params, and replicated int32 step counts.
  assert 0 < rows['optimizer state'] - 2 * rows['trainable params'] <= 16
  assert rows['gradients, activations, temps'] > 0
  assert rows['peak'] > rows['trainable params'] + rows['optimizer state']
  assert 'all-gather' in result.stdout  # FSDP gathers each layer's weights.


def test_collectives_in_a_loop_count_once_per_iteration():
  mesh = jax.make_mesh((8,), ('x',), axis_types=(AxisType.Auto,))

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=P('x'), out_specs=P())
  def gather_three_times(x_local):  # [2, 4] per device.
    def gather(carry, _):
      return jax.lax.all_gather(carry, 'x', tiled=True)[:2] + 1.0, None
    x_local, _ = jax.lax.scan(gather, x_local, None, length=3)
    return jax.lax.psum(x_local, 'x')

  compiled = gather_three_times.lower(jax.ShapeDtypeStruct((16, 4), jnp.float32)).compile()
  counts = collectives.count(compiled.as_text())
  assert counts['all-gather'] == (3, 3 * 16 * 4 * 4)  # Three gathers of [16, 4] f32.
  assert counts['all-reduce'] == (1, 2 * 4 * 4)
  np.testing.assert_equal(sorted(counts), ['all-gather', 'all-reduce'])
