"""Text from a trained run: `load` its checkpoint, `sample_texts` continues prompts with it."""
from typing import Sequence

from etils import epath
import ml_collections

from lepton_jax import checkpoint, config_lib, data, experiment, generate, pretrained, prune, quant
from lepton_jax import sharding, train_state
from lepton_jax.model import ModelConfig, Transformer
from lepton_jax.model.config import QuantConfig


def load(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """(model, variables, tokenizer) of the run in `workdir`, from its latest checkpoint or `step`.

  `config` is the run's config (its model, data and mesh settings); the variables (params alone:
  no optimizer state is read, whichever optimizer trained them) are placed on the mesh it
  describes, and quantized as config.quant says (lepton_jax/quant.py). An int8 checkpoint
  (scripts/quantize.py) brings its own model, tokenizer and int8 weights, a pruned one
  (scripts/prune.py) its own model and tokenizer.
  """
  config = pretrained.resolve(prune.resolve(quant.resolve(config, workdir), workdir))
  config_lib.validate(config)
  if not (epath.Path(workdir) / 'checkpoints').is_dir():  # Local or gs://, as orbax writes.
    raise FileNotFoundError(f'{workdir} holds no checkpoints; train there first '
                            f'(lepton-train --workdir={workdir}).')
  # The checkpoint's own weights (float for a trained run but a QLoRA one), quantized below if
  # config.quant asks.
  stored = ml_collections.ConfigDict(config.to_dict())
  stored.quant = config_lib.base_config().quant
  stored.quant.update(quant.stored_weight_fields(workdir))
  stored.prune = config_lib.base_config().prune  # Pruned weights are zero: no masks needed.
  # The run's own tokenizer: one trained now for other data settings would not match the model.
  run = experiment.build(stored, workdir, same_split=False, train_tokenizer=False)
  available = run.checkpointer.all_steps()
  step = available[-1] if step is None and available else step
  if step not in available:
    raise FileNotFoundError(f'{workdir}/checkpoints has no checkpoint of step {step}; '
                            f'it has steps {available}.')
  mesh, rules = sharding.make_mesh(config.mesh), config.mesh.rules
  with sharding.use_mesh(mesh, rules):
    variables = run.checkpointer.restore_variables(
        step, checkpoint.abstract_like(*train_state.abstract_variables(run.model, mesh, rules,
                                                                        config.seq_len)))
  run.checkpointer.close()
  model, variables = quant.quantize(run.model, variables, QuantConfig.from_config(config.quant),
                                    mesh, rules)
  return model, variables, run.tokenizer


def prompt_tokens(tokenizer, prompt: str) -> list[int]:
  """`prompt` as text appeared in training: after a document boundary (the end of one document,
  the start of the next)."""
  return [tokenizer.eos_id] + data.document_start(tokenizer) + tokenizer.encode(prompt)


def settings(sample_config: ml_collections.ConfigDict) -> dict:
  """The sampling keywords of `sample_texts` from `config.sample`."""
  return {key: sample_config[key] for key in ('temperature', 'top_k', 'top_p', 'min_p', 'seed')}


def check_fits(model_config: ModelConfig, tokenizer, sample_config: ml_collections.ConfigDict):
  """Raises naming config.sample unless its prompt and num_tokens fit the model's positions, so
  that a run learns it before training rather than after."""
  try:
    generate.check_prompts(model_config, [prompt_tokens(tokenizer, sample_config.prompt)],
                           sample_config.num_tokens)
  except ValueError as e:
    raise ValueError(f'config.sample.prompt={sample_config.prompt!r} with '
                     f'config.sample.num_tokens={sample_config.num_tokens}: {e}') from None


def sample_texts(model: Transformer, variables, tokenizer, prompts: Sequence[str],
                 num_tokens: int, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, seed: int = 0) -> list[str]:
  """Each prompt followed by up to `num_tokens` new tokens, drawn in one batch by the KV-cache
  decoder (lepton_jax/generate.py); a text ends early where the model ends its document."""
  starts = [prompt_tokens(tokenizer, prompt) for prompt in prompts]
  new = generate.generate(model, variables, starts, num_tokens, temperature, top_k, top_p, seed,
                          stop_ids=tokenizer.eos_ids, min_p=min_p)
  boundary = len(prompt_tokens(tokenizer, ''))
  return [tokenizer.decode(start[boundary:] + tokens) for start, tokens in zip(starts, new)]
