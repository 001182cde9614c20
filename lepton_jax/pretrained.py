"""Starting a run from trained weights (`config.init_from`) instead of a random init.

  init_from='hf:/path/to/dir'         a Hugging Face causal-LM directory (lepton_jax/hf)
  init_from='workdir:/path[:step]'    another lepton run (its latest checkpoint, or `step`)

The model's architecture fields and the tokenizer come from the source: a config that sets an
architecture field to something else than the default and the source's value is refused, naming
both. How the model runs (attention implementation, scan, remat, dtypes) stays the config's. A
run started this way checkpoints and resumes like any other: on resume its own checkpoint wins.
"""
import dataclasses

from etils import epath
import jax
import ml_collections

from lepton_jax import adapters, checkpoint, config_lib, quant, train_state, tree
from lepton_jax.model import Transformer
from lepton_jax.model.config import ARCHITECTURE_FIELDS, LoraConfig, PeftConfig, QuantConfig


@dataclasses.dataclass(frozen=True)
class Source:
  kind: str  # 'hf' | 'workdir'
  path: str
  step: int | None = None  # workdir: the checkpoint to start from (None: the latest).


def parse(init_from: str) -> Source:
  kind, _, rest = init_from.partition(':')
  if kind == 'hf' and rest:
    return Source('hf', rest)
  if kind == 'workdir' and rest:
    path, _, step = rest.rpartition(':')
    if step.isdigit() and path:
      return Source('workdir', path, int(step))
    return Source('workdir', rest)
  raise ValueError(f"config.init_from={init_from!r}: expected 'hf:DIR' or 'workdir:DIR[:STEP]'")


def _read_run_config(path: str) -> ml_collections.ConfigDict:
  run_config = config_lib.read_run_config(path)
  if run_config is None:
    raise FileNotFoundError(f'{epath.Path(path) / config_lib.RUN_CONFIG} does not exist: '
                            f'config.init_from=workdir:{path} needs a run trained by lepton-train '
                            '(which writes it)')
  return run_config


def source_model_and_tokenizer(source: Source) -> tuple[dict, dict]:
  """(architecture fields, data tokenizer fields) of the source."""
  if source.kind == 'hf':
    from lepton_jax import hf  # The hf extra, only when asked for.
    return hf.architecture(source.path), {'tokenizer': 'hf', 'tokenizer_path': source.path}
  run_config = _read_run_config(source.path)
  return ({field: run_config.model[field] for field in ARCHITECTURE_FIELDS},
          {'tokenizer': run_config.data.tokenizer,
           'tokenizer_path': run_config.data.tokenizer_path})


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the model and tokenizer of `config.init_from` (unchanged when it is '')."""
  if not config.init_from:
    return config
  source = parse(config.init_from)
  fields, tokenizer = source_model_and_tokenizer(source)
  defaults = config_lib.model_config()
  resolved = ml_collections.ConfigDict(config.to_dict())
  for field, value in fields.items():
    given = config.model[field]
    if given != defaults[field] and given != value:
      raise ValueError(f'config.model.{field}={given!r} contradicts config.init_from='
                       f'{config.init_from!r}, whose model has {field}={value!r}')
    resolved.model[field] = value
  if not config.data.tokenizer_path:  # An explicit tokenizer directory may replace the source's.
    resolved.data.update(tokenizer)
  return resolved


def load_variables(config: ml_collections.ConfigDict, model, abstract_variables: dict) -> dict:
  """The source's values of the leaves of `abstract_variables` (with shardings: where they go)
  that are not adapters (adapters.ADAPTERS, of any config.peft method): a run's adapters are
  new, its base comes from the source.

  An int8 base (config.quant.weights, QLoRA) is the source's float weights quantized as `model`
  says (lepton_jax/quant.py), which gives the same bits at every load: a resumed run's base
  matches its checkpoints' fingerprint. A quant.qat model's weights are float params: the
  source's, unquantized.
  """
  wanted = dict(abstract_variables, params=adapters.base_of(abstract_variables.get('params', {})))
  mesh, rules = jax.tree.leaves(abstract_variables)[0].sharding.mesh, config.mesh.rules
  without_adapters = dataclasses.replace(model.cfg, lora=LoraConfig(), peft=PeftConfig())
  float_model = Transformer(dataclasses.replace(without_adapters, quant=QuantConfig()))
  # qat trains float weights (fake-quantized in the forward pass): they load as they are.
  quantized = model.cfg.quant.stores_int8
  if quantized:
    float_wanted = checkpoint.abstract_like(*train_state.abstract_variables(float_model, mesh,
                                                                             rules, 1))
  variables = _source_variables(parse(config.init_from), float_model,
                                float_wanted if quantized else wanted, mesh, rules)
  if quantized:
    _, variables = quant.quantize(float_model, variables, model.cfg.quant, mesh, rules)
  return tree.select(variables, wanted)


def _source_variables(source: Source, float_model: Transformer, wanted: dict, mesh,
                      rules) -> dict:
  if source.kind == 'hf':
    from lepton_jax import hf
    # The source's own head: a classify head over a causal LM starts new (its LM head unused).
    head = hf.architecture(source.path).get('head', 'lm')
    source_model = Transformer(dataclasses.replace(float_model.cfg, head=head))
    return tree.select(hf.load_variables(source.path, source_model, mesh, rules), wanted)
  if float_model.cfg.head == 'classify' and _read_run_config(source.path).model.head != 'classify':
    # A classify head over a language-model run starts new, as over an HF causal LM.
    wanted = dict(wanted, params={k: v for k, v in wanted['params'].items() if k != 'score'})
  checkpointer = checkpoint.Checkpointer(source.path, read_only=True)
  try:
    step = source.step if source.step is not None else checkpointer.latest_step()
    if step not in checkpointer.all_steps():
      raise FileNotFoundError(f'{source.path}/checkpoints has no checkpoint of step {step}; it has '
                              f'steps {checkpointer.all_steps()}')
    return checkpointer.restore_variables(step, wanted)
  finally:
    checkpointer.close()
