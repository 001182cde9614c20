"""Draw text from a trained model (a fixed-window loop; the KV-cache decoder is in a later room)."""
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lepton_jax import checkpoint, config_lib, data, experiment, pretrained, sharding
from lepton_jax import train_state


def load(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  """(model, variables, tokenizer) of the run in `workdir`, from its latest checkpoint or `step`.

  `config` is the run's config (its model, data and mesh settings); the variables (params alone:
  no optimizer state is read, whichever optimizer trained them) are placed on the mesh it
  describes.
  """
  config = pretrained.resolve(config)
  config_lib.validate(config)
  if not (epath.Path(workdir) / 'checkpoints').is_dir():  # Local or gs://, as orbax writes.
    raise FileNotFoundError(f'{workdir} holds no checkpoints; train there first '
                            f'(lepton-train --workdir={workdir}).')
  # The run's own tokenizer: one trained now for other data settings would not match the model.
  run = experiment.build(config, workdir, same_split=False, train_tokenizer=False)
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
  return run.model, variables, run.tokenizer


def sample_text(model: nn.Module, variables, tokenizer, prompt: str, num_tokens: int,
                temperature: float, top_k: int, window: int, seed: int) -> str:
  """Appends `num_tokens` sampled tokens to `prompt`, attending to at most `window` tokens."""
  # Start as at a document boundary: the end of one document, the start of the next.
  start = [tokenizer.eos_id] + data.document_start(tokenizer)
  tokens = start + tokenizer.encode(prompt)

  @jax.jit
  def next_token(variables, window_1T, last_index, key):
    logits_V = model.apply(variables, window_1T)[0, last_index]
    if top_k:
      kth_largest = jax.lax.top_k(logits_V, top_k)[0][-1]
      logits_V = jnp.where(logits_V < kth_largest, -jnp.inf, logits_V)
    return jax.random.categorical(key, logits_V / max(temperature, 1e-6))

  key = jax.random.key(seed)
  for i in range(num_tokens):
    context = tokens[-window:]
    window_1T = np.zeros((1, window), np.int32)
    window_1T[0, :len(context)] = context  # Right padding is invisible to causal attention.
    tokens.append(int(next_token(variables, window_1T, len(context) - 1, jax.random.fold_in(key, i))))
  return tokenizer.decode(tokens[len(start):])
