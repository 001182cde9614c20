"""`lepton-serve` (or `python -m lepton_jax.serve`): an OpenAI-compatible server for a model.

  lepton-serve --hf_dir=/models/Qwen2.5-0.5B [--max_batch=16] [--port=8000]
  lepton-serve --config=configs/stdlib_tiny.py --workdir=/tmp/stdlib_tiny [--step=400]
      [--host=127.0.0.1] [--max_seq_len=N] [--api_key=KEY] [--drain_s=30]
      [--adapter=NAME=PATH ...]

Each --adapter is a LoRA adapter over the served base, asked for as model NAME: PATH is a PEFT
adapter directory (over --hf_dir) or a lepton LoRA run's workdir (trained from this base). One
batch mixes requests of every adapter (lora.per_row).

The model loads as lepton-eval loads it (safetensors or orbax, never pickle); --config.mesh.tensor
splits it over that many devices. See docs/serving.md.
"""
import dataclasses
import os

from absl import app, flags
from etils import epath
import jax

from lepton_jax import cli, config_lib, evaluate, lora, sample, sharding
from lepton_jax.model import Transformer
from lepton_jax.model.config import ARCHITECTURE_FIELDS


def define_flags() -> None:
  """lepton-serve's own flags, besides cli's (defined when it runs, never on import)."""
  flags.DEFINE_string('hf_dir', None, 'Serve this Hugging Face model directory instead of a '
                      '--workdir run.')
  flags.DEFINE_integer('step', None, 'Checkpoint step of the --workdir run (default: latest).')
  flags.DEFINE_string('name', None, 'The model id clients ask for (default: the directory name).')
  flags.DEFINE_string('host', '127.0.0.1', 'Address to bind; 0.0.0.0 serves every interface.')
  flags.DEFINE_integer('port', 8000, 'Port to bind.', lower_bound=0)
  flags.DEFINE_integer('max_batch', 8, 'Decode slots: requests decoded together.', lower_bound=1)
  flags.DEFINE_integer('max_seq_len', None, "Context (prompt + new tokens) of every slot; "
                       "default and upper bound: the model's.", lower_bound=1)
  flags.DEFINE_integer('max_queue', 256, 'Requests that may wait for a slot; more get 503.',
                       lower_bound=1)
  flags.DEFINE_string('api_key', os.environ.get('LEPTON_API_KEY'), 'Require Authorization: '
                      'Bearer KEY on every endpoint but /health (default: $LEPTON_API_KEY).')
  flags.DEFINE_float('drain_s', 30.0, 'On SIGTERM, how long in-flight requests may finish.',
                     lower_bound=0)
  flags.DEFINE_integer('max_body_kb', 4096, 'Largest request body accepted.', lower_bound=1)
  flags.DEFINE_multi_string('adapter', [], 'NAME=PATH: a LoRA adapter served as model NAME (a '
                            'PEFT directory over --hf_dir, or a lepton LoRA run\'s workdir).')


def load_adapters(specs: list[str], model: Transformer, hf_dir: str | None):
  """(the model with the adapters' LoRA config, {name: adapter}) of --adapter NAME=PATH flags."""
  adapters, lora_config = {}, None
  for spec in specs:
    name, _, path = spec.partition('=')
    if not name or not path:
      raise ValueError(f'--adapter={spec!r}: expected NAME=PATH')
    if name in adapters:
      raise ValueError(f'--adapter: two adapters are named {name!r}')
    if (epath.Path(path) / 'adapter_config.json').exists():
      if not hf_dir:
        raise ValueError(f'--adapter={spec}: a PEFT adapter needs its base model as --hf_dir')
      from lepton_jax import hf  # pylint: disable=g-import-not-at-top  (the hf extra)
      adapted, variables = hf.load(hf_dir, adapter=path)
    else:
      run_config = config_lib.read_run_config(path)
      if run_config is None:
        raise FileNotFoundError(f'--adapter={spec}: {path} is neither a PEFT adapter directory '
                                f'(adapter_config.json) nor a lepton run (no '
                                f'{config_lib.RUN_CONFIG})')
      adapted, variables, _ = sample.load(run_config, path)
    architecture = lambda cfg: {field: getattr(cfg, field) for field in ARCHITECTURE_FIELDS}
    if architecture(adapted.cfg) != architecture(model.cfg):
      raise ValueError(f'--adapter={spec}: its base model is not the one served')
    if not adapted.cfg.lora.enabled:
      raise ValueError(f'--adapter={spec}: {path} holds no LoRA adapter')
    if lora_config not in (None, adapted.cfg.lora):
      raise ValueError(f'--adapter={spec}: other LoRA settings than the first adapter\'s (one '
                       'server mixes adapters of one targets, rank and alpha)')
    lora_config = adapted.cfg.lora
    adapters[name] = lora.adapter_of(variables['params'])
  if not adapters:
    return model, {}
  return Transformer(dataclasses.replace(model.cfg, lora=lora_config)), adapters


def serve_mesh(mesh_config):
  """The server's mesh: the model split over `tensor` devices, the batch over none."""
  if mesh_config.data not in (1, -1) or mesh_config.fsdp != 1:
    raise ValueError(f'config.mesh: data={mesh_config.data}, fsdp={mesh_config.fsdp}: the server '
                     'splits the batch over no axis; set --config.mesh.tensor=N alone and run a '
                     'server per replica')
  mesh_config = mesh_config.copy_and_resolve_references()
  mesh_config.data = 1
  return sharding.make_mesh(mesh_config, devices=jax.devices()[:mesh_config.tensor])


def main(argv):
  from lepton_jax.serve import server  # pylint: disable=g-import-not-at-top  (the serve extra)
  f = cli.FLAGS
  if f.config is None and not f.hf_dir:
    raise app.UsageError('--config is required (with --workdir), or give --hf_dir')
  if bool(f.workdir) == bool(f.hf_dir):
    raise app.UsageError('give one of --workdir (a lepton run) and --hf_dir')
  config = f.config if f.config is not None else config_lib.base_config()
  with cli.command_line('lepton-serve', argv, needs_workdir=False):
    config_lib.validate(config)
    mesh = serve_mesh(config.mesh)
    model, variables, tokenizer = evaluate.load(config, f.workdir, f.hf_dir, f.step)
    model, adapters = load_adapters(f.adapter, model, f.hf_dir)
    name = f.name or os.path.basename(os.path.normpath(f.hf_dir or f.workdir))
    served = server.build(model, variables, tokenizer, name, max_batch=f.max_batch,
                          max_seq_len=f.max_seq_len, max_queue=f.max_queue, mesh=mesh,
                          rules=config.mesh.rules, api_key=f.api_key,
                          max_body_bytes=f.max_body_kb * 1024, adapters=adapters)
    server.serve(served, f.host, f.port, f.drain_s)


def run():
  """Console-script entry point (`lepton-serve`)."""
  cli.define_flags()
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
