"""Write an int8 checkpoint of a trained run or a Hugging Face model (lepton_jax/quant.py).

  python scripts/quantize.py --config=configs/stdlib_tiny.py --workdir=/tmp/stdlib_tiny \
      --out=/tmp/stdlib_tiny_int8 --config.quant.weights=int8 [--config.quant.granularity=group]
  python scripts/quantize.py --hf_dir=/models/Llama-3.2-1B --out=/tmp/llama_int8 \
      --config=configs/base.py --config.quant.weights=int8

The source is never modified. OUT then loads like a run's workdir, its model, tokenizer and
int8 weights coming from OUT itself:

  python scripts/sample.py --config=configs/stdlib_tiny.py --workdir=/tmp/stdlib_tiny_int8
  lepton-eval --config=configs/stdlib_tiny.py --workdir=/tmp/stdlib_tiny_int8
  model, variables, tokenizer = sample.load(config, '/tmp/stdlib_tiny_int8')

Prints the bytes of the int8 variables beside those of the same weights in f32 and bf16.
"""
from absl import app, flags
import jax
import ml_collections

from lepton_jax import cli, config_lib, evaluate, quant, sharding

flags.DEFINE_string('out', None, 'Directory to write the int8 checkpoint to (new or empty).')
flags.DEFINE_string('hf_dir', None, 'Quantize this Hugging Face model directory instead of a '
                    '--workdir run.')
flags.DEFINE_integer('step', None, 'Checkpoint step of the --workdir run (default: the latest).')


def main(argv):
  f = cli.FLAGS
  if bool(f.workdir) == bool(f.hf_dir):
    raise app.UsageError('give one of --workdir (a lepton run) and --hf_dir')
  config = f.config if f.config is not None else config_lib.base_config()
  with cli.command_line('quantize', argv, needs_workdir=False):
    if not f.out:
      raise ValueError('--out is required: the directory to write the int8 checkpoint to')
    if config.quant.weights == 'none':
      raise ValueError("config.quant.weights='none' leaves nothing to quantize: give "
                       '--config.quant.weights=int8 (and --config.quant.* for the scheme)')
    model, variables, tokenizer = evaluate.load(config, f.workdir, f.hf_dir, f.step)
    if f.hf_dir:  # The directory's tokenizer, which OUT gets a copy of.
      config = ml_collections.ConfigDict(config.to_dict())
      config.data.update(tokenizer='hf', tokenizer_path=f.hf_dir)
    source = f'hf:{f.hf_dir}' if f.hf_dir else f'workdir:{f.workdir}' + (
        f':{f.step}' if f.step is not None else '')
    with sharding.use_mesh(sharding.make_mesh(config.mesh), config.mesh.rules):
      quant.save(f.out, config, model, variables, tokenizer.path or f.hf_dir or '', source)
  if jax.process_index() == 0:
    int8_bytes = quant.variable_bytes(variables)
    for dtype in ('float32', 'bfloat16'):
      float_bytes = quant.float_bytes(variables, dtype)
      print(f'{dtype}: {float_bytes / 2**20:.2f} MiB', flush=True)
    print(f'int8 ({model.cfg.quant.granularity}): {int8_bytes / 2**20:.2f} MiB = '
          f'{int8_bytes / quant.float_bytes(variables, "float32"):.2f} of float32, '
          f'{int8_bytes / quant.float_bytes(variables, "bfloat16"):.2f} of bfloat16', flush=True)
    print(f'Wrote {f.out}', flush=True)


if __name__ == '__main__':
  cli.define_flags()
  app.run(main, flags_parser=cli.parse_flags)
