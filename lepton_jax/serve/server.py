"""Putting a server together: `build` a Served from a loaded model, `serve` it with uvicorn.

  served = server.build(model, variables, tokenizer, name='tiny', max_batch=16)
  server.serve(served, host='127.0.0.1', port=8000, drain_s=30)   # until SIGTERM or Ctrl-C

`serve` starts the engine (compiling every shape first), answers HTTP until SIGTERM/SIGINT, then
admits nothing more, lets in-flight requests finish for up to `drain_s` seconds, stops the engine
and returns.
"""
import contextlib
import json
import logging
import signal
import sys
import threading

from etils import epath
import uvicorn

from lepton_jax.data import chat, tokenizers
from lepton_jax.serve import api, engine as engine_lib

SPECIAL_TOKENS = ('bos_token', 'eos_token', 'pad_token', 'unk_token')


def hf_tokenizer_info(directory: str) -> dict:
  """vLLM's /tokenizer_info fields a Hugging Face tokenizer directory names."""
  config_file = epath.Path(directory) / 'tokenizer_config.json'
  config = json.loads(config_file.read_text()) if config_file.exists() else {}
  info = {'tokenizer_class': config.get('tokenizer_class')}
  for key in SPECIAL_TOKENS:
    token = config.get(key)
    info[key] = token['content'] if isinstance(token, dict) else token
  return info


def chat_encoder(tokenizer: tokenizers.Tokenizer):
  """(messages, add_generation_prompt) -> ids through the model's chat template (lepton's own
  format for its bytes and SentencePiece tokenizers), or (None, why not) without one."""
  if not isinstance(tokenizer, tokenizers.HFTokenizer):
    return lambda messages, add: chat.encode(tokenizer, messages, add)[0], None
  try:
    template = chat.hf_template(tokenizer.path)
  except (ValueError, FileNotFoundError) as e:
    return None, (f'this model has no chat template ({e}); /v1/chat/completions needs one: '
                  'use /v1/completions')

  def encode(messages, add_generation_prompt):
    chat.check_messages(messages)
    return template.encode(messages, add_generation_prompt)[0]

  return encode, None


def build(model, variables, tokenizer: tokenizers.Tokenizer, name: str, *, max_batch: int = 8,
          max_seq_len: int | None = None, max_queue: int = 256, mesh=None, rules=None,
          api_key: str | None = None, max_body_bytes: int = 4 * 2**20,
          adapters: dict[str, dict] | None = None) -> api.Served:
  """The engine (not started) and everything the HTTP layer needs about the model; `adapters`
  (LoRA adapters over it by name, lora.adapter_of trees) are served as models of those names."""
  if adapters and name in adapters:
    raise ValueError(f'--adapter {name}=...: {name!r} is the base model\'s name')
  engine = engine_lib.Engine(model, variables, tokenizer.eos_ids, max_batch=max_batch,
                             max_seq_len=max_seq_len, max_queue=max_queue, mesh=mesh, rules=rules,
                             adapters=adapters)
  encode, chat_error = chat_encoder(tokenizer)
  info = {'eos_token': None, 'bos_token': None}
  if isinstance(tokenizer, tokenizers.HFTokenizer):
    info.update(hf_tokenizer_info(tokenizer.path))
    if encode is not None:
      info['chat_template'] = chat.hf_template(tokenizer.path).source
  return api.Served(engine=engine, tokenizer=tokenizer, name=name,
                    vocab_size=model.cfg.vocab_size, chat=encode,
                    chat_error=chat_error or '', tokenizer_info=info, api_key=api_key,
                    max_body_bytes=max_body_bytes)


class _Server(uvicorn.Server):
  """uvicorn, whose exit signal also stops the engine admitting requests, and after which the
  process exits normally (uvicorn would raise the signal again once shut down: exit -15)."""

  def __init__(self, config: uvicorn.Config, served: api.Served):
    super().__init__(config)
    self.served = served

  def handle_exit(self, sig, frame) -> None:
    self.served.engine.drain()
    super().handle_exit(sig, frame)

  @contextlib.contextmanager
  def capture_signals(self):
    if threading.current_thread() is not threading.main_thread():
      yield  # Signals reach the main thread only (a server in a test's thread).
      return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
    try:
      yield
    finally:
      for sig, handler in previous.items():
        signal.signal(sig, handler)


def uvicorn_server(served: api.Served, host: str, port: int, drain_s: float) -> uvicorn.Server:
  config = uvicorn.Config(api.create_app(served), host=host, port=port, log_level='warning',
                          timeout_graceful_shutdown=drain_s, access_log=False)
  return _Server(config, served)


def serve(served: api.Served, host: str = '127.0.0.1', port: int = 8000,
          drain_s: float = 30.0) -> None:
  """Runs the server until SIGTERM or SIGINT, then drains (see the module docstring)."""
  if host not in ('127.0.0.1', 'localhost', '::1') and served.api_key is None:
    logging.warning('lepton-serve: --host=%s without --api_key (or LEPTON_API_KEY): anyone who '
                    'can reach this port can use the model', host)
  served.engine.start()
  try:
    print(f'lepton-serve: {served.name} on http://{host}:{port}/v1', file=sys.stderr, flush=True)
    uvicorn_server(served, host, port, drain_s).run()
  finally:
    served.engine.stop()
