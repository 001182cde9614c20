"""Completions of text prompts with lepton_jax.generate, cut at stop strings."""
from collections.abc import Sequence

from lepton_jax import generate
from lepton_jax.data import tokenizers
from lepton_jax.evals import scoring


def cut(text: str, until: Sequence[str]) -> str:
  """`text` up to the first occurrence of any stop string."""
  ends = [text.find(stop) for stop in until if stop and stop in text]
  return text[:min(ends)] if ends else text


class Completer:
  """Greedy (or sampled) completions of prompts, `batch_size` prompts per `generate` call.

  A prompt starts after the document prefix (scoring.prefix_id) and loses its oldest tokens when
  it and `max_new_tokens` would not fit the model. Rows end at the tokenizer's eos ids and at stop
  strings that are one token; longer stop strings are cut from the decoded text.
  """

  def __init__(self, model, tokenizer: tokenizers.Tokenizer, batch_size: int,
               max_new_tokens: int, until: Sequence[str] = ('\n',), temperature: float = 0.0):
    max_len = model.cfg.max_seq_len
    if not 0 < max_new_tokens < max_len:
      raise ValueError(f'max_new_tokens={max_new_tokens}: must be in [1, {max_len}) for a model '
                       f'with max_seq_len={max_len}')
    self.model, self.tokenizer = model, tokenizer
    self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
    self.until = (until,) if isinstance(until, str) else tuple(until)
    self.temperature = temperature
    self._prompt_len = max_len - max_new_tokens + 1  # generate runs prompt + new - 1 positions.
    single = [tokenizer.encode(stop) for stop in self.until]
    self._stop_ids = sorted({*tokenizer.eos_ids, *(ids[0] for ids in single if len(ids) == 1)})

  def __call__(self, variables, prompts: Sequence[str]) -> list[str]:
    prefix = [scoring.prefix_id(self.tokenizer)]
    ids = [(prefix + self.tokenizer.encode(p))[-self._prompt_len:] for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # Similar lengths batch together.
    texts = [''] * len(ids)
    for first in range(0, len(order), self.batch_size):
      chunk = order[first:first + self.batch_size]
      new_ids = generate.generate(self.model, variables, [ids[i] for i in chunk],
                                  self.max_new_tokens, temperature=self.temperature,
                                  stop_ids=self._stop_ids)
      for i, new in zip(chunk, new_ids):
        texts[i] = cut(self.tokenizer.decode(new), self.until)
    return texts
