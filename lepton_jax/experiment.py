"""What a run is built from, given its config and workdir: shared by training, sampling and every
tool that reads a run (tokenizer, model, checkpoints, and the check that they agree)."""
import dataclasses

from etils import epath
import ml_collections

from lepton_jax import adalora, adapters, checkpoint, config_lib, data, lora, optim, pretrained
from lepton_jax import prune, sharding, train_state, tree
from lepton_jax.model import ModelConfig, Transformer
from lepton_jax.model.config import model_fields


@dataclasses.dataclass(frozen=True)
class Experiment:
  tokenizer: data.Tokenizer
  model_config: ModelConfig  # config.model with vocab_size resolved, config.lora, config.quant.
  model: Transformer
  trainable: tuple[str, ...]  # Patterns of the params that train (adapters.trainable_patterns).
  checkpointer: checkpoint.Checkpointer
  meta: dict  # checkpoint.describe() of the model's variables, saved with every checkpoint.


def build(config: ml_collections.ConfigDict, workdir: str, same_split: bool,
          train_tokenizer: bool = True) -> Experiment:
  """Tokenizer (trained into the workdir if needed and allowed), model and checkpoints.

  Raises if the workdir's latest checkpoint holds other variables than this model (or, with
  `same_split`, as for resuming training, trains other ones), before anything is written.
  """
  tokenizer = data.build_tokenizer(config.data, workdir, train_if_missing=train_tokenizer)
  model_config = ModelConfig.from_config(config_lib.resolve_vocab(config.model, tokenizer,
                                                                   config.data.labels),
                                         config.lora, config.quant, config.prune, config.peft,
                                         config.seed)
  model = Transformer(model_config)
  variables = sharding.unbox_abstract(train_state.boxed_variables(model, config.seq_len))
  lora.check_targets(model_config.lora, variables, model_config.tie_embeddings)
  trainable = adapters.trainable_patterns(config)
  mask = train_state.trainable_mask(variables['params'], trainable)
  if same_split:  # Training: the masks a run prunes must be computable and train.
    prune.check_training(model_config.prune, variables.get(prune.MASKS),
                         tree.partition(variables['params'], mask)[0])
  meta = checkpoint.describe(variables, mask)
  frozen_source = None
  if config.init_from:  # A LoRA run's checkpoints reference their base there.
    frozen_source = lambda abstract: pretrained.load_variables(config, model, abstract)
  checkpointer = checkpoint.Checkpointer(workdir, config.keep_checkpoints,
                                         frozen_source=frozen_source)
  checkpointer.check_compatible(meta, same_split)
  return Experiment(tokenizer, model_config, model, trainable, checkpointer, meta)


def make_optimizer(config: ml_collections.ConfigDict):
  """(optax transformation, schedule) of a run: config.optimizer, with LoRA+'s learning rate
  for the adapters' B, and AdaLoRA's rank allocation after it."""
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps,
                                      ((lora.B_PARAMS, config.lora.plus_ratio),))
  if config.peft.method == 'adalora':
    tx = adalora.allocate(tx, config.peft, config.total_steps)
  return tx, schedule


def penalty(config: ml_collections.ConfigDict):
  """The loss term a method adds to the step's, as a function of the trainable params (None:
  none): AdaLoRA's orthogonality regulariser."""
  if config.peft.method == 'adalora' and config.peft.orth_reg_weight:
    return lambda trainable: config.peft.orth_reg_weight * adalora.orthogonality(trainable)
  return None


def save_run_config(config: ml_collections.ConfigDict, run: Experiment, workdir: str) -> None:
  """Writes WORKDIR/config.json: the config with what was resolved at start-up filled in (the
  model's vocab_size, the tokenizer's file), so another run can start from this one."""
  resolved = ml_collections.ConfigDict(config.to_dict())
  resolved.model.update(model_fields(run.model_config))  # The groups keep their own.
  resolved.data.tokenizer_path = run.tokenizer.path or config.data.tokenizer_path
  path = epath.Path(workdir) / config_lib.RUN_CONFIG
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(resolved.to_json_best_effort(indent=2))
