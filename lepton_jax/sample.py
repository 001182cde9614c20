"""Draw text from a trained model (a fixed-window loop; the KV-cache decoder is in a later room)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sample_text(model: nn.Module, params, tokenizer, prompt: str, num_tokens: int,
                temperature: float, top_k: int, window: int, seed: int) -> str:
  """Appends `num_tokens` sampled tokens to `prompt`, attending to at most `window` tokens."""
  tokens = [tokenizer.eos_id] + tokenizer.encode(prompt)  # Start as at a document boundary.

  @jax.jit
  def next_token(params, window_1T, last_index, key):
    logits_V = model.apply({'params': params}, window_1T)[0, last_index]
    if top_k:
      kth_largest = jax.lax.top_k(logits_V, top_k)[0][-1]
      logits_V = jnp.where(logits_V < kth_largest, -jnp.inf, logits_V)
    return jax.random.categorical(key, logits_V / max(temperature, 1e-6))

  key = jax.random.key(seed)
  for i in range(num_tokens):
    context = tokens[-window:]
    window_1T = np.zeros((1, window), np.int32)
    window_1T[0, :len(context)] = context  # Right padding is invisible to causal attention.
    tokens.append(int(next_token(params, window_1T, len(context) - 1, jax.random.fold_in(key, i))))
  return tokenizer.decode(tokens[1:])
