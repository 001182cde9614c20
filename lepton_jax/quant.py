"""Post-training int8 quantization of a loaded model (config.quant), and int8 checkpoints.

  model, variables = quant.quantize(model, variables, QuantConfig(weights='int8'), mesh, rules)

Quantizing never modifies a trained run: it transforms the variables of a model loaded for
evaluation, sampling, generation or export. A quantized Dense's float kernel leaves `params` and
its int8 kernel and scale join the `quant` collection (lepton_jax/model/layers.py creates them
from the float kernel, so the model itself says how each of its weights is laid out).

Of config.quant, the weight fields (WEIGHT_FIELDS) say what an int8 checkpoint holds; the others
(activations, kv_cache, kernel) say how a model runs and may change at every load: the same int8
weights serve weight-only and W8A8, with or without an int8 KV cache.

An int8 checkpoint (scripts/quantize.py) is a directory laid out like a run's workdir: config.json
(the source's resolved config with `quant` and `quantized_from` added), checkpoints/STEP (the
variables) and the tokenizer's files, so `scripts/sample.py`, `lepton-eval` and `sample.load` read
it with `--workdir=DIR`, taking its model, tokenizer and weight fields from DIR/config.json.
"""
import dataclasses
import shutil

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lepton_jax import checkpoint, config_lib, sharding, tree
from lepton_jax.model import Transformer
from lepton_jax.model.config import ARCHITECTURE_FIELDS, QuantConfig, model_fields

WEIGHT_FIELDS = ('weights', 'granularity', 'group_size', 'embed', 'head', 'exclude')
TOKENIZER_DIR = 'tokenizer'  # Inside an int8 checkpoint: the tokenizer's files.
# Of a Hugging Face directory, what is the model's weights rather than its tokenizer.
WEIGHT_FILE_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.h5', '.msgpack', '.gguf')


def weight_fields(quant: QuantConfig) -> dict:
  return {field: getattr(quant, field) for field in WEIGHT_FIELDS}


def quantize(model: Transformer, variables: dict, quant: QuantConfig, mesh=None,
             rules=()) -> tuple[Transformer, dict]:
  """(model, variables) that compute with `quant`: the float weights it names quantized, on
  `mesh` by the logical `rules` when given. A model whose weights are int8 already keeps them and
  takes only the runtime fields of `quant`; other weight fields are refused."""
  cfg = model.cfg
  quant.check(cfg.tie_embeddings)
  # A run trained with qat loads as the int8 model its float weights trained through.
  quant = dataclasses.replace(quant, qat=False)
  quantized = dataclasses.replace(model, cfg=dataclasses.replace(cfg, quant=quant))
  if weight_fields(quant) == weight_fields(cfg.quant):
    return quantized, variables
  if cfg.quant.weights != 'none':
    raise ValueError(f'these weights are int8 already ({weight_fields(cfg.quant)}); quantize the '
                     f'float model for {weight_fields(quant)}')
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(quantized.init, jax.random.key(0), tokens)
  abstract = sharding.unbox_abstract(boxed)
  out_shardings = None
  if mesh is not None:
    out_shardings = sharding.param_shardings(boxed, mesh, rules)

  def transform(variables):
    _, created = quantized.apply(variables, tokens, mutable=['quant'])
    return tree.merge(tree.select(variables, {'params': abstract['params']}),
                      nn.unbox(created))

  return quantized, jax.jit(transform, out_shardings=out_shardings)(variables)


def variable_bytes(variables: dict) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(variables))


def float_bytes(variables: dict, dtype) -> int:
  """What `variables` would take with every int8 kernel (and each float leaf) as `dtype`, scales
  dropped: the float checkpoint an int8 one is set against."""
  names = tree.names(variables)
  itemsize = np.dtype(dtype).itemsize
  return sum(leaf.size * itemsize for name, leaf in zip(names, jax.tree.leaves(variables))
             if not (name.startswith('quant/') and name.endswith('/scale')))


# --- int8 checkpoints ------------------------------------------------------------------------

def read_quantized_config(workdir: str) -> ml_collections.ConfigDict | None:
  """DIR/config.json of an int8 checkpoint, or None where `workdir` is not one."""
  saved = config_lib.read_run_config(workdir)
  return saved if saved is not None and 'quantized_from' in saved else None


def stored_weight_fields(workdir: str) -> dict:
  """The int8 weight fields of what `workdir`'s checkpoints hold: an int8 checkpoint's, or those
  of the int8 base a QLoRA run trained over; {} where they hold float weights."""
  run_config = config_lib.read_run_config(workdir)
  saved = run_config.get('quant', {}) if run_config is not None else {}
  if saved.get('weights', 'none') == 'none' or saved.get('qat', False):
    return {}
  return {field: tuple(saved[field]) if isinstance(saved[field], list) else saved[field]
          for field in WEIGHT_FIELDS}


def resolve(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """`config` with the model, tokenizer and quant weight fields of the int8 checkpoint in
  `workdir` (unchanged when it is not one). config.quant's runtime fields stay the config's; a
  weight field set otherwise than both the default and the checkpoint is refused."""
  saved = read_quantized_config(workdir)
  if saved is None:
    return config
  resolved = ml_collections.ConfigDict(config.to_dict())
  default = QuantConfig()
  for field in WEIGHT_FIELDS:
    given, stored = config.quant[field], saved.quant[field]
    if isinstance(stored, (list, tuple)):
      given, stored = tuple(given), tuple(stored)
    if given != getattr(default, field) and given != stored:
      raise ValueError(f'config.quant.{field}={given!r} contradicts {workdir}, an int8 checkpoint '
                       f'with {field}={stored!r}; quantize the float run again instead')
    resolved.quant[field] = stored
  resolved.model.update({field: saved.model[field] for field in ARCHITECTURE_FIELDS})
  resolved.lora.update(saved.lora.to_dict())
  tokenizer_path = saved.data.tokenizer_path
  resolved.data.tokenizer = saved.data.tokenizer
  resolved.data.tokenizer_path = str(epath.Path(workdir) / tokenizer_path) if tokenizer_path else ''
  resolved.init_from = ''  # Everything it needs is in the directory.
  return resolved


def copy_tokenizer(tokenizer_path: str, out: epath.Path) -> str:
  """Copies a tokenizer (a SentencePiece file, or a Hugging Face directory's files but its
  weights) into out/TOKENIZER_DIR; returns its path relative to `out` ('' for none)."""
  if not tokenizer_path:
    return ''
  source, into = epath.Path(tokenizer_path), out / TOKENIZER_DIR
  into.mkdir(parents=True, exist_ok=True)
  if not source.is_dir():
    shutil.copyfile(source, into / source.name)
    return f'{TOKENIZER_DIR}/{source.name}'
  for file in source.iterdir():
    if file.is_file() and not file.name.endswith(WEIGHT_FILE_SUFFIXES):
      shutil.copyfile(file, into / file.name)
  return TOKENIZER_DIR


def save(out: str, config: ml_collections.ConfigDict, model: Transformer, variables: dict,
         tokenizer_path: str, source: str) -> None:
  """Writes an int8 checkpoint to the new directory `out` (see the module docstring), as step 0;
  `source` (config.init_from's syntax) is recorded as its `quantized_from`."""
  out_dir = epath.Path(out)
  if out_dir.exists() and any(out_dir.iterdir()):
    raise FileExistsError(f'{out} is not empty: give a new directory for the int8 checkpoint')
  saved = ml_collections.ConfigDict(config.to_dict())
  saved.model.update(model_fields(model.cfg))
  saved.quant.update(dataclasses.asdict(model.cfg.quant))
  saved.data.tokenizer_path = copy_tokenizer(tokenizer_path, out_dir)
  saved.init_from = ''
  saved.quantized_from = source
  all_params = jax.tree.map(lambda _: True, variables['params'])
  checkpointer = checkpoint.Checkpointer(out)
  checkpointer.save_variables(0, variables, checkpoint.describe(variables, all_params))
  checkpointer.close()
  (out_dir / config_lib.RUN_CONFIG).write_text(saved.to_json_best_effort(indent=2))
