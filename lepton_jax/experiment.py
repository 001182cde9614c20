"""What a run is built from, given its config and workdir: shared by training and sampling."""
import dataclasses
import os

import ml_collections
import optax

from lepton_jax import checkpoint, config_lib, data, optim
from lepton_jax.model import ModelConfig, Transformer

# Model fields that change parameter shapes or the parameter tree: a checkpoint only restores
# into a model that agrees on all of them.
SHAPE_FIELDS = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
                'd_ff', 'mlp', 'norm', 'positions', 'qkv_bias', 'out_bias', 'mlp_bias',
                'tie_embeddings', 'qk_norm', 'scan_layers', 'param_dtype')


@dataclasses.dataclass(frozen=True)
class Experiment:
  tokenizer: data.Tokenizer
  model_config: ml_collections.ConfigDict  # config.model with vocab_size resolved.
  model: Transformer
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  checkpointer: checkpoint.Checkpointer
  meta: dict  # SHAPE_FIELDS of the model, saved with every checkpoint.


def build(config: ml_collections.ConfigDict, workdir: str,
          train_tokenizer: bool = True) -> Experiment:
  """Tokenizer (trained into the workdir if needed and allowed), model, optimizer and checkpoints.

  Raises if the workdir's latest checkpoint holds a different model, before anything is written.
  """
  tokenizer = data.build_tokenizer(config.data, workdir, train_if_missing=train_tokenizer)
  model_config = config_lib.resolve_vocab(config.model, tokenizer)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  meta = {k: model_config[k] for k in SHAPE_FIELDS}
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                         config.keep_checkpoints)
  checkpointer.check_compatible(meta)
  return Experiment(tokenizer, model_config, Transformer(ModelConfig.from_config(model_config)),
                    tx, schedule, checkpointer, meta)
