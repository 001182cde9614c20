"""Chat rendering (lepton_jax.data.chat) against transformers' apply_chat_template (offline)."""
import pytest

from lepton_jax.data import chat
from lepton_jax.data import tokenizers
from tests.conftest import save_tiny_chat_tokenizer

transformers = pytest.importorskip('transformers')

# Meta-Llama-3-8B-Instruct's template, verbatim, and the same text with generation markers.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_MARKED = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
# Qwen2-Instruct's ChatML template, verbatim (a default system prompt), and marked.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEMPLATES = {'llama3': (LLAMA3, LLAMA3_MARKED, '<|eot_id|>'),
             'chatml': (CHATML, CHATML_MARKED, '<|im_end|>')}

CHATS = {
    'system_user_assistant': [
        {'role': 'system', 'content': 'You answer in one line.'},
        {'role': 'user', 'content': 'the quick brown fox?'},
        {'role': 'assistant', 'content': 'jumps over the lazy dog 3.'}],
    'multi_turn': [
        {'role': 'user', 'content': 'line 1: the quick'},
        {'role': 'assistant', 'content': 'brown fox jumps'},
        {'role': 'user', 'content': 'over the lazy ☃ dog?'},
        {'role': 'assistant', 'content': '  naïve 日本語 answer  \n'}],
    'ends_with_user': [
        {'role': 'user', 'content': 'first'},
        {'role': 'assistant', 'content': 'second'},
        {'role': 'user', 'content': 'third'}],
}


@pytest.fixture(scope='module')
def tokenizer_dirs(tmp_path_factory):
  """{(family, marked): directory} of the tiny tokenizer with each template."""
  dirs = {}
  for family, (plain, marked, eos) in TEMPLATES.items():
    for is_marked, template in ((False, plain), (True, marked)):
      directory = tmp_path_factory.mktemp(f'{family}_{is_marked}')
      save_tiny_chat_tokenizer(directory, template, eos_token=eos)
      dirs[family, is_marked] = str(directory)
  return dirs


def reference(directory, messages, add_generation_prompt):
  """transformers' (input_ids, assistant_masks)."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                      add_generation_prompt=add_generation_prompt,
                                      return_assistant_tokens_mask=True)
  return out['input_ids'], out['assistant_masks']


@pytest.mark.parametrize('family', sorted(TEMPLATES))
@pytest.mark.parametrize('name', sorted(CHATS))
@pytest.mark.parametrize('add_generation_prompt', [False, True])
def test_ids_and_masks_equal_transformers(tokenizer_dirs, family, name, add_generation_prompt):
  messages = CHATS[name]
  marked_ids, marked_mask = reference(tokenizer_dirs[family, True], messages, add_generation_prompt)
  plain_ids, _ = reference(tokenizer_dirs[family, False], messages, add_generation_prompt)
  assert marked_ids == plain_ids  # The marked template renders the same text.
  assert sum(marked_mask) > 0
  for marked in (True, False):  # Marked: the template's spans; plain: rendered prefixes.
    ids, mask = chat.encode(tokenizer_dirs[family, marked], messages, add_generation_prompt)
    assert ids == marked_ids
    assert mask == marked_mask


def test_assistant_mask_covers_the_content_and_end_of_turn_only(tokenizer_dirs):
  directory = tokenizer_dirs['chatml', False]
  ids, mask = chat.encode(directory, CHATS['multi_turn'])
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  masked = tokenizer.decode([i for i, m in zip(ids, mask) if m])
  assert masked == 'brown fox jumps<|im_end|>  naïve 日本語 answer  \n<|im_end|>'


def test_a_lepton_tokenizer_uses_the_default_format():
  tokenizer = tokenizers.ByteTokenizer()
  messages = CHATS['system_user_assistant']
  ids, mask = chat.encode(tokenizer, messages, add_generation_prompt=False)
  eos = [tokenizer.eos_id]
  expected = []
  for message in messages:
    expected += list(f"<|{message['role']}|>\n{message['content']}".encode()) + eos
  assert ids == expected
  assistant = list(b'jumps over the lazy dog 3.') + eos
  assert [i for i, m in zip(ids, mask) if m] == assistant
  assert mask[-len(assistant):] == [1] * len(assistant)
  prompted, prompted_mask = chat.encode(tokenizer, messages[:2], add_generation_prompt=True)
  assert prompted == expected[:len(prompted) - 14] + list(b'<|assistant|>\n')
  assert not any(prompted_mask)


@pytest.mark.parametrize('messages,error', [
    ([], 'non-empty list'),
    ([{'role': 'robot', 'content': 'x'}], r"messages\[0\].role='robot' is not one of"),
    ([{'role': 'user', 'content': 'x'}, {'role': 'assistant'}],
     r'messages\[1\].content must be a string, got None'),
    (['hello'], r"messages\[0\] is not an object: 'hello'"),
])
def test_malformed_messages_are_named(messages, error):
  with pytest.raises(ValueError, match=error):
    chat.encode(tokenizers.ByteTokenizer(), messages)


def test_template_errors_are_one_line(tmp_path):
  save_tiny_chat_tokenizer(tmp_path / 'strict', "{% if messages[0]['role'] != 'user' %}"
                           "{{ raise_exception('Conversations must start with a user turn') }}"
                           "{% endif %}{{ messages[0]['content'] }}")
  with pytest.raises(ValueError, match=r'^the chat template fails to render this chat: '
                     r'TemplateError: Conversations must start with a user turn$'):
    chat.encode(str(tmp_path / 'strict'), CHATS['system_user_assistant'])
  save_tiny_chat_tokenizer(tmp_path / 'none', None)
  with pytest.raises(ValueError, match=r'none has no chat template'):
    chat.encode(str(tmp_path / 'none'), CHATS['multi_turn'])


def test_a_template_that_rewrites_history_needs_generation_markers(tmp_path):
  # Shows only the last assistant turn in full, as reasoning templates drop old thinking.
  template = ("{% for m in messages %}{{ m['role'] + ': ' }}{% if m['role'] == 'assistant' and "
              "not loop.last %}...{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}")
  save_tiny_chat_tokenizer(tmp_path / 'rewrites', template)
  with pytest.raises(ValueError, match=r'renders messages\[:2\] differently .* generation'):
    chat.encode(str(tmp_path / 'rewrites'), CHATS['multi_turn'])
