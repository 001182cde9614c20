"""Chat rendering: a list of messages -> token ids and the loss mask of the assistant's turns.

`encode(tokenizer_dir, messages)` renders with the jinja2 `chat_template` of a Hugging Face
tokenizer directory (chat_template.jinja, or tokenizer_config.json's `chat_template`) in the
environment transformers' `apply_chat_template` renders in (sandboxed, trim_blocks, lstrip_blocks,
loop controls, `{% generation %}`, `tojson`, `raise_exception`, `strftime_now`, and the special
tokens of tokenizer_config.json as variables), then tokenizes the text whole, adding no special
tokens: the ids are apply_chat_template(messages, tokenize=True)'s.

The loss mask is 1 on every token whose characters overlap an assistant span, transformers' rule
for `return_assistant_tokens_mask`. The spans are
- what `{% generation %}...{% endgeneration %}` encloses, for templates that mark them (the mask
  then equals transformers'); otherwise
- found by rendering prefixes: assistant turn i runs from the end of messages[:i] rendered with the
  generation prompt to the end of messages[:i + 1] rendered without it, less the whitespace the
  template writes after the turn (ChatML's newline after <|im_end|>): the turn's content and its
  end-of-turn token. Both renderings must begin the whole chat's; a template that rewrites earlier
  turns (dropping old reasoning, say) needs generation markers instead.

Lepton's own tokenizers (bytes, sentencepiece) have no template and use a fixed one: each turn is
the text `<|ROLE|>\n` and the content, then eos; the generation prompt is `<|assistant|>\n`; the
loss covers an assistant turn's content and its eos. Pieces are tokenized separately, so a turn's
ids never depend on its neighbours.
"""
from collections.abc import Sequence
import contextlib
import contextvars
import datetime
import functools
import json
import re

from etils import epath

from lepton_jax.data import tokenizers

ROLES = ('system', 'user', 'assistant')
_GENERATION_TAG = re.compile(r'\{%-?\s*generation\s*-?%\}')

Messages = Sequence[dict]


def encode(tokenizer: str | tokenizers.Tokenizer, messages: Messages,
           add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
  """(ids, loss_mask) of a chat; `tokenizer` is a Hugging Face directory or a lepton Tokenizer.

  Raises ValueError when a message is malformed or the template fails to render it.
  """
  check_messages(messages)
  if isinstance(tokenizer, str):
    return hf_template(tokenizer).encode(messages, add_generation_prompt)
  if isinstance(tokenizer, tokenizers.HFTokenizer):
    return hf_template(tokenizer.path).encode(messages, add_generation_prompt)
  return _default_encode(tokenizer, messages, add_generation_prompt)


def check_messages(messages: Messages) -> None:
  """Raises ValueError naming the first message that is not {'role': ROLE, 'content': str}."""
  if not isinstance(messages, list) or not messages:
    raise ValueError(f'messages must be a non-empty list, got {_short(messages)}')
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise ValueError(f'messages[{i}] is not an object: {_short(message)}')
    if message.get('role') not in ROLES:
      raise ValueError(f'messages[{i}].role={_short(message.get("role"))} is not one of {ROLES}')
    if not isinstance(message.get('content'), str):
      raise ValueError(f'messages[{i}].content must be a string, got '
                       f'{_short(message.get("content"))}')


def _short(value) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + '...'


def _default_encode(tokenizer: tokenizers.Tokenizer, messages: Messages,
                    add_generation_prompt: bool) -> tuple[list[int], list[int]]:
  ids = tokenizers.document_start(tokenizer)
  mask = [0] * len(ids)
  for message in messages:
    header = tokenizer.encode(f"<|{message['role']}|>\n")
    body = tokenizer.encode(message['content']) + [tokenizer.eos_id]
    ids += header + body
    mask += [0] * len(header) + [int(message['role'] == 'assistant')] * len(body)
  if add_generation_prompt:
    prompt = tokenizer.encode('<|assistant|>\n')
    ids, mask = ids + prompt, mask + [0] * len(prompt)
  return ids, mask


@functools.lru_cache(maxsize=8)
def hf_template(directory: str) -> 'HFChatTemplate':
  """The chat template of a Hugging Face tokenizer directory, compiled once per process."""
  return HFChatTemplate(directory)


class HFChatTemplate:
  """A directory's chat template and tokenizer.json, rendering and tokenizing as transformers."""

  def __init__(self, directory: str):
    import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top  (the hf extra)
    path = epath.Path(directory)
    config_file = path / 'tokenizer_config.json'
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    self.source = _template_source(path, config)
    if not (path / 'tokenizer.json').exists():
      raise FileNotFoundError(f'{path} has no tokenizer.json; chat rendering needs the fast '
                              "tokenizer's character offsets, as transformers' assistant masks do.")
    self._tokenizer = hf_tokenizers.Tokenizer.from_str((path / 'tokenizer.json').read_text())
    self._template = _environment().from_string(self.source)
    self._special_tokens = {key: value['content'] if isinstance(value, dict) else value
                            for key, value in config.items()
                            if key.endswith('_token') and isinstance(value, (str, dict))}
    self.marks_generation = bool(_GENERATION_TAG.search(self.source))

  def render(self, messages: Messages, add_generation_prompt: bool) -> tuple[str, list]:
    """(text, [(start, end) character spans of each `{% generation %}` block])."""
    blocks, spans = [], []
    variables = dict(self._special_tokens, messages=[dict(m) for m in messages], tools=None,
                     documents=None, add_generation_prompt=add_generation_prompt)
    try:
      with self._template.environment.track_generation(blocks, spans):
        for block in self._template.generate(**variables):
          blocks.append(block)
    except Exception as e:  # pylint: disable=broad-except  (jinja raises anything a template does)
      raise ValueError(f'the chat template fails to render this chat: {type(e).__name__}: '
                       f'{e}') from None
    return ''.join(blocks), spans

  def encode(self, messages: Messages, add_generation_prompt: bool) -> tuple[list[int], list[int]]:
    text, spans = self.render(messages, add_generation_prompt)
    if not self.marks_generation:
      spans = self._prefix_spans(messages, text)
    encoding = self._tokenizer.encode(text, add_special_tokens=False)
    return encoding.ids, _overlap_mask(encoding.offsets, spans)

  def _prefix_spans(self, messages: Messages, text: str) -> list[tuple[int, int]]:
    spans = []
    for i, message in enumerate(messages):
      if message['role'] != 'assistant':
        continue
      before, _ = self.render(messages[:i], add_generation_prompt=True)
      through, _ = self.render(messages[:i + 1], add_generation_prompt=False)
      if not (text.startswith(through) and through.startswith(before)):
        raise ValueError(f'the chat template renders messages[:{i + 1}] differently inside the '
                         'whole chat, so its assistant turns cannot be found by rendering '
                         'prefixes; mark them with {% generation %} ... {% endgeneration %}')
      spans.append((len(before), max(len(before), len(through.rstrip()))))
    return spans


def _overlap_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list:
  """1 for each token whose characters [start, end) overlap a span (spans in order)."""
  mask, span = [0] * len(offsets), 0
  for index, (start, end) in enumerate(offsets):
    while span < len(spans) and start >= spans[span][1]:
      span += 1
    if span == len(spans):
      break
    if end > spans[span][0]:
      mask[index] = 1
  return mask


def _template_source(path: epath.Path, config: dict) -> str:
  """chat_template.jinja (transformers 5 writes it), else tokenizer_config.json's chat_template
  (a string, or named templates of which 'default' is the one apply_chat_template uses)."""
  if (path / 'chat_template.jinja').exists():
    return (path / 'chat_template.jinja').read_text()
  template = config.get('chat_template')
  if isinstance(template, list):
    template = {t.get('name'): t.get('template') for t in template}.get('default')
  if not isinstance(template, str):
    raise ValueError(f'{path} has no chat template (chat_template.jinja or tokenizer_config.json '
                     "chat_template); data.format='chat' needs one, or a lepton tokenizer")
  return template


@functools.cache
def _environment():
  """The jinja2 environment apply_chat_template renders in (transformers 5.24), sandboxed: a
  template is code from whoever published the tokenizer."""
  import jinja2  # pylint: disable=g-import-not-at-top  (jinja2 comes with the hf extra)
  import jinja2.ext  # pylint: disable=g-import-not-at-top
  import jinja2.sandbox  # pylint: disable=g-import-not-at-top

  class GenerationSpans(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: records where its output lands in the text."""
    tags = {'generation'}

    def __init__(self, environment):
      super().__init__(environment)
      self._tracking = contextvars.ContextVar('generation_spans', default=None)
      environment.extend(track_generation=self.track)

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(['name:endgeneration'], drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method('_record'), [], [], body).set_lineno(lineno)

    def _record(self, caller):
      output = caller()
      if (tracking := self._tracking.get()) is not None:
        blocks, spans = tracking
        start = len(''.join(blocks))
        spans.append((start, start + len(output)))
      return output

    @contextlib.contextmanager
    def track(self, blocks: list, spans: list):
      token = self._tracking.set((blocks, spans))
      try:
        yield
      finally:
        self._tracking.reset(token)

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[GenerationSpans, jinja2.ext.loopcontrols])
  environment.filters['tojson'] = tojson
  environment.globals.update(raise_exception=raise_exception,
                             strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
  return environment
