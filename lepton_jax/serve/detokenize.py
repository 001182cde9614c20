"""The text a client sees as tokens arrive: incremental detokenization and stop strings.

Decoding token by token is wrong for most tokenizers: a character may span several byte tokens,
and SentencePiece writes a piece's leading space only after another piece. `Detokenizer` decodes
a short window of the latest tokens (vLLM's prefix/read offsets) and gives out only text that no
later token can change; `TextStream` also holds back what may be the start of a stop string and
ends the text before the first one. The unstreamed response is the same increments joined, so
streamed and unstreamed text are equal by construction.
"""
from typing import Sequence

from lepton_jax.data import tokenizers

CONTEXT = 5  # Prompt tokens decoded before the first new one: how the first piece's space reads.
REPLACEMENT = '\ufffd'  # What a decoder writes for bytes that do not (yet) make a character.


class Detokenizer:
  """Text increments of a growing list of tokens, continuing `context` (the prompt's ids)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, context: Sequence[int] = ()):
    self._decode = tokenizer.decode
    self._ids = list(context[-CONTEXT:])
    self._prefix, self._read = 0, len(self._ids)  # ids[prefix:read] is the text given out last.

  def add(self, token: int) -> str:
    """The text that `token` completes ('' while a character or a piece is unfinished)."""
    self._ids.append(token)
    return self._increment(final=False)

  def flush(self) -> str:
    """The text not yet given out, finished or not (the end of the stream)."""
    return self._increment(final=True)

  def _increment(self, final: bool) -> str:
    before = self._decode(self._ids[self._prefix:self._read])
    after = self._decode(self._ids[self._prefix:])
    if len(after) <= len(before) or after.endswith(REPLACEMENT) and not final:
      return ''
    self._prefix, self._read = self._read, len(self._ids)
    return after[len(before):]


class TextStream:
  """A completion's text as tokens arrive, ended before the first of `stop` strings."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, context: Sequence[int],
               stop: Sequence[str] = ()):
    self._detokenizer = Detokenizer(tokenizer, context)
    self._stop = [s for s in stop if s]
    self._hold = max(map(len, self._stop), default=1) - 1  # Chars that may start a stop string.
    self._text = ''  # Everything decoded; the first `shown` characters were given out.
    self._shown = 0
    self.stopped = False  # A stop string was found: the text is complete.

  def add(self, token: int) -> str:
    """The new text to show after `token` ('' once stopped)."""
    if self.stopped:
      return ''
    self._text += self._detokenizer.add(token)
    return self._release(final=False)

  def finish(self) -> str:
    """The rest of the text, at the end of the generation."""
    if self.stopped:
      return ''
    self._text += self._detokenizer.flush()
    return self._release(final=True)

  def _release(self, final: bool) -> str:
    # Text up to `shown` holds no start of a stop string: one starting there would have ended
    # within the held-back characters and been found then.
    found = [i for i in (self._text.find(s, self._shown) for s in self._stop) if i >= 0]
    if found:
      self.stopped = True
      end = min(found)
    else:
      end = len(self._text) if final else max(self._shown, len(self._text) - self._hold)
    text, self._shown = self._text[self._shown:end], end
    return text
