"""Per-device memory of a training config on a mesh, sized before renting the hardware.

  python scripts/estimate_memory.py --config=configs/llama_1b.py:v5e-16 \
      [--config.mesh.fsdp=8 --config.mesh.tensor=2 ...] [--num_devices=16 | --topology=v5e:4x4]
      [--collectives]

The train step that training runs (`train_state.jit_train_step`) is compiled ahead of time from
shapes alone: nothing is allocated, so a mesh far larger than this machine works. The devices are
either `--num_devices` simulated CPU devices, or with `--topology` the chips of a Cloud TPU slice
(XLA:TPU compiles for it through libtpu, `pip install libtpu`; no TPU needed). Params and
optimizer state are exact (the bytes of one shard under the rules); gradients, activations and
XLA's scratch come from the compiled memory analysis: the TPU compiler's own figure with
`--topology`, XLA:CPU's buffer assignment otherwise (a guide: fusion and attention differ).
`--collectives` also lists the cross-device collectives one step runs (see collectives.py).
"""
import math
import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import topologies

from lepton_jax import checkpoint, cli, experiment, lora, sharding, train_state
from lepton_jax.data import tokenizers
from lepton_jax.model import ModelConfig, Transformer

import collectives  # scripts/, beside this file.

cli.define_flags()
_NUM_DEVICES = flags.DEFINE_integer(
    'num_devices', None, 'Devices to simulate; default: the product of the mesh axis sizes.')
_TOPOLOGY = flags.DEFINE_string(
    'topology', None, 'Compile for this Cloud TPU slice instead, e.g. v5e:4x4, v5p:2x2x2.')
_COLLECTIVES = flags.DEFINE_bool('collectives', False, 'Also list the collectives per step.')


def model_with_vocab(config: ml_collections.ConfigDict) -> Transformer:
  """The config's model; vocab_size=0 takes the size the configured tokenizer would have."""
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  if not model_config.vocab_size:
    bytes_tokenizer = config.data.tokenizer == 'bytes'
    model_config.vocab_size = (tokenizers.ByteTokenizer.vocab_size if bytes_tokenizer
                               else config.data.vocab_size)
  return Transformer(ModelConfig.from_config(model_config, config.lora))


def compile_train_step(config: ml_collections.ConfigDict, devices: list[jax.Device]):
  """-> (compiled train step, its train_state.Layout), compiled from shapes only."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = config.mesh.rules
  model = model_with_vocab(config)
  tx, schedule = experiment.make_optimizer(config)
  # Outside the mesh context: make_layout makes a dummy input on the default (CPU) device.
  layout = train_state.make_layout(model, tx, mesh, rules, config.seq_len,
                                   lora.trainable_patterns(config))
  batch_sharding = sharding.batch_sharding(mesh, rules)
  tokens = jax.ShapeDtypeStruct((config.batch_size, config.seq_len), jnp.int32,
                                sharding=batch_sharding)
  batch = {'inputs': tokens, 'targets': tokens}
  if config.data.document_masking:  # The pipeline's per-document columns (data/pipeline.py).
    batch.update(segment_ids=tokens, positions=tokens)
  with sharding.use_mesh(mesh, rules):
    step_fn = train_state.jit_train_step(model, tx, schedule, config, layout, batch_sharding)
    compiled = step_fn.lower(checkpoint.abstract_like(layout.state, layout.state_shardings),
                             checkpoint.abstract_like(layout.frozen, layout.frozen_shardings),
                             batch).compile()
  return compiled, layout


def shard_bytes(abstract, shardings) -> int:
  """Bytes one device holds of a tree: each leaf's shard shape under its sharding."""
  leaves = zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))
  return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in leaves)


def memory_report(compiled, layout: train_state.Layout) -> dict[str, int]:
  """Per-device bytes: exact state shards, the compiled step's scratch, and its peak."""
  analysis = compiled.memory_analysis()
  params = shard_bytes(layout.state.trainable, layout.state_shardings.trainable)
  frozen = shard_bytes(layout.frozen, layout.frozen_shardings)
  opt_state = shard_bytes(layout.state.opt_state, layout.state_shardings.opt_state)
  return {
      'trainable params': params,
      'frozen variables': frozen,
      'optimizer state': opt_state,
      'batch and scalars': analysis.argument_size_in_bytes - params - frozen - opt_state,
      # Gradients, activations kept for the backward pass and XLA's scratch, every buffer
      # counted once as if all were live together: an upper bound on what they add.
      'gradients, activations, temps': analysis.temp_size_in_bytes,
      # The compiler's peak of the buffers live at once, state and batch included.
      'peak': analysis.peak_memory_in_bytes,
  }


def mesh_description(config: ml_collections.ConfigDict, devices: list[jax.Device]) -> str:
  shape = sharding.mesh_shape(config.mesh, len(devices))
  axes = ' x '.join(f'{axis}={size}' for axis, size in zip(sharding.MESH_AXES, shape))
  return f'{axes} ({len(devices)} {devices[0].device_kind} devices)'


def simulated_devices(mesh_config: ml_collections.ConfigDict) -> int:
  if _NUM_DEVICES.value:
    return _NUM_DEVICES.value
  sizes = [mesh_config[axis] for axis in sharding.MESH_AXES]
  if -1 in sizes:
    raise app.UsageError('config.mesh has a -1 axis: give --num_devices')
  return math.prod(sizes)


def target_devices(mesh_config: ml_collections.ConfigDict) -> list[jax.Device]:
  """The TPU slice's chips (compile only), or simulated CPU devices."""
  # Before the backend starts: whatever is attached here, nothing runs on it.
  jax.config.update('jax_platforms', 'cpu')
  if _TOPOLOGY.value:
    return topologies.get_topology_desc(_TOPOLOGY.value, 'tpu').devices
  jax.config.update('jax_num_cpu_devices', simulated_devices(mesh_config))
  return jax.devices()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _TOPOLOGY.value and _COLLECTIVES.value:
    raise app.UsageError('--collectives counts the simulated CPU compile: drop --topology '
                         '(XLA:TPU rewrites collectives into async and windowed forms)')
  config = flags.FLAGS.config
  devices = target_devices(config.mesh)
  try:
    compiled, layout = compile_train_step(config, devices)
  except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a program that cannot fit.
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    sys.exit(f'does not fit on {mesh_description(config, devices)}: {str(e).splitlines()[0]}')
  num_params = sum(x.size for x in jax.tree.leaves(layout.variables['params']))
  print(f'{num_params / 1e9:.3f}B parameters, batch {config.batch_size} x {config.seq_len}, '
        f'mesh {mesh_description(config, devices)}')
  print(f'{"per device":32s} {"bytes":>16s} {"GiB":>8s}')
  for name, size in memory_report(compiled, layout).items():
    print(f'{name:32s} {size:16,d} {size / 2**30:8.3f}')
  if _TOPOLOGY.value:  # Proof that attention='splash' compiled to its kernel (forward, dq, dkv).
    print(f'Pallas kernel calls in the compiled step: {compiled.as_text().count("tpu_custom_call")}')
  if _COLLECTIVES.value:

    print(collectives.format_table(collectives.count(compiled.as_text())))


if __name__ == '__main__':
  cli.run(main)
