"""Test-process setup: 8 simulated CPU devices and a persistent XLA compilation cache (shared with
the commands tests start); a fake gs://;
and the helpers tests share (`tiny_config`, `override`, `read_metrics`, `TEXT`, and for Hugging Face
tests `save_tiny_hf_llama`, `save_tiny_hf_models`, `save_tiny_chat_tokenizer`, `finetune_config`):
tests import them from here, never from each other.

Many tests train the same tiny model; the cache lets every run after the first skip compilation
(keys include the HLO and the jax version, so a changed model never hits a stale entry).
"""
import json
import os
import pathlib
import tempfile

from etils import epath
import etils.epath.testing  # pylint: disable=unused-import  (epath.testing.mock_epath)
import pytest

if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  # A subprocess that imports these helpers may have chosen its own device count.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Through the environment, so the commands tests start (lepton-train, scripts) share the cache.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'lepton_jax_test_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # pylint: disable=g-import-not-at-top  (flags above must precede the first import)

from lepton_jax import config_lib  # pylint: disable=g-import-not-at-top

TEXT = ''.join(f'line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n'
               for i in range(400))


def tiny_config(tmp_path: pathlib.Path | None = None, **overrides):
  """A byte-level experiment small enough to train in seconds on 8 simulated devices.

  With `tmp_path` its corpus (TEXT) is written there; dotted keyword arguments override any
  field (`**{'model.num_layers': 3}`).
  """
  config = config_lib.base_config()
  config.total_steps = 30
  config.batch_size = 8
  config.seq_len = 32
  config.log_every_steps = 1
  config.eval_every_steps = 10
  config.eval_batches = 2
  config.checkpoint_every_steps = 10
  config.data.source = 'text'
  config.data.tokenizer = 'bytes'
  if tmp_path is not None:
    corpus = tmp_path / 'corpus.txt'
    if not corpus.exists():
      corpus.write_text(TEXT)
    config.data.path = str(corpus)
  config.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                      d_ff=64, max_seq_len=32)
  config.optimizer.update(learning_rate=3e-3, warmup_steps=5)
  config.sample.num_tokens = 0
  return override(config, **overrides)


def train_preempted_and_resumed(config, workdir, monkeypatch, at_step: int) -> None:
  """Trains `config` in `workdir`, preempted (SIGTERM's path) after step `at_step`, then
  restarted to the end: what an exact-resume test compares with an uninterrupted run."""
  from lepton_jax import train  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(train.PreemptionWatch, 'reached', lambda self, step: step == at_step)
  train.train_and_evaluate(config, str(workdir))
  monkeypatch.undo()
  train.train_and_evaluate(config, str(workdir))


def override(config, **dotted):
  """`config` with dotted keys set (`**{'model.num_layers': 3}`)."""
  for key, value in dotted.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def save_tiny_hf_llama(directory, seed: int = 0) -> None:
  """A tiny random Llama and a BPE tokenizer trained on TEXT, as a released model ships them
  (config.json, safetensors, tokenizer.json; bos <s> = 0, eos </s> = 1). Needs the hf extra."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  bpe.train_from_iterator([TEXT], tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<s>', '</s>'], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token='<s>',
                                       eos_token='</s>').save_pretrained(directory)
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
      eos_token_id=1, rope_parameters={'rope_type': 'default', 'rope_theta': 5000.0})
  transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)


HF_VOCAB = 96
# One tiny random model of every family hf.load reads: GQA, untied heads, non-default rope_theta
# and norm eps everywhere; the family's own feature each.
TINY_HF_MODELS = ('llama', 'llama3.1', 'llama_bias_tied', 'mistral', 'qwen2', 'qwen3', 'gpt2')


def tiny_hf_config(name: str):
  """The transformers config of TINY_HF_MODELS' `name`. Needs the hf extra."""
  import transformers  # pylint: disable=g-import-not-at-top
  decoder = dict(vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                 max_position_embeddings=64,
                 rope_parameters={'rope_type': 'default', 'rope_theta': 5000.0})
  llama3_rope = {'rope_type': 'llama3', 'rope_theta': 5000.0, 'factor': 8.0,
                 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                 'original_max_position_embeddings': 16}
  return {
      'llama': lambda: transformers.LlamaConfig(**decoder),
      'llama3.1': lambda: transformers.LlamaConfig(
          **dict(decoder, max_position_embeddings=128, rope_parameters=llama3_rope)),
      'llama_bias_tied': lambda: transformers.LlamaConfig(
          **decoder, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
      'mistral': lambda: transformers.MistralConfig(**decoder, sliding_window=5),
      'qwen2': lambda: transformers.Qwen2Config(**decoder),
      'qwen3': lambda: transformers.Qwen3Config(**decoder, head_dim=12),
      'gpt2': lambda: transformers.GPT2Config(vocab_size=HF_VOCAB, n_embd=32, n_layer=2, n_head=4,
                                              n_positions=64, layer_norm_epsilon=1e-4),
  }[name]()


def save_tiny_hf_model(directory, name: str, seed: int = 0) -> None:
  """TINY_HF_MODELS' `name`, random from `seed`, saved to `directory`. Needs the hf extra."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  transformers.AutoModelForCausalLM.from_config(tiny_hf_config(name)).save_pretrained(directory)


def save_tiny_hf_models(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Every TINY_HF_MODELS model, random (seed 0) with non-trivial norm weights and biases, so that
  a mapping that drops one cannot pass, saved under `root`: name -> directory."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  dirs = {}
  for name in TINY_HF_MODELS:
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(name)).eval()
    with torch.no_grad():
      for param_name, param in model.named_parameters():
        if ('norm' in param_name or 'ln_' in param_name) and param_name.endswith('weight'):
          param.copy_(1 + 0.2 * torch.randn_like(param))
        elif param_name.endswith('bias'):
          param.copy_(0.1 * torch.randn_like(param))
    dirs[name] = root / name
    model.save_pretrained(dirs[name])
  return dirs


CHAT_SPECIAL_TOKENS = ('<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>',
                       '<|eot_id|>', '<|im_start|>', '<|im_end|>')


def save_tiny_chat_tokenizer(directory, chat_template: str, eos_token: str = '<|eot_id|>') -> None:
  """A BPE tokenizer trained on TEXT with Llama-3 and ChatML control tokens, saved as
  transformers saves one, with `chat_template`. Needs the hf extra."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  bpe.train_from_iterator([TEXT], tokenizers.trainers.BpeTrainer(
      vocab_size=320, special_tokens=list(CHAT_SPECIAL_TOKENS), show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, bos_token='<|begin_of_text|>', eos_token=eos_token,
      chat_template=chat_template).save_pretrained(directory)


def finetune_config(hf_dir, tmp_path: pathlib.Path, **overrides):
  """configs/finetune_hf.py on `hf_dir`, shrunk to two steps on TEXT (written to tmp_path)."""
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module('configs.finetune_hf').get_config(str(hf_dir))
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(TEXT)
  config.update(total_steps=2, batch_size=8, seq_len=32, log_every_steps=1, eval_every_steps=2,
                eval_batches=1, checkpoint_every_steps=2)
  config.data.update(source='text', path=str(corpus))
  config.sample.num_tokens = 0
  return override(config, **overrides)


def read_metrics(workdir) -> list[dict]:
  """The records of a run's metrics.jsonl, in order."""
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


@pytest.fixture
def fake_gcs(tmp_path):
  """gs://BUCKET/... paths, for etils.epath, stored under tmp_path/gcs/BUCKET/...

  With the one difference from a local disk that matters to lepton_jax: an object cannot be
  appended to, and gcsfs opens mode 'a' as 'w' (it warns and overwrites).
  """
  root = tmp_path / 'gcs'

  def local(path) -> str:  # Local paths pass through: the mock replaces every epath backend.
    path = os.fspath(path)
    return str(root / path.removeprefix('gs://')) if path.startswith('gs://') else path

  def on_local(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def open_(original, path, mode):
    if os.fspath(path).startswith('gs://'):
      mode = mode.replace('a', 'w')
    return original(local(path), mode)

  def two_paths(original, path, dst):
    return original(local(path), local(dst))

  def glob(original, pattern):
    if not os.fspath(pattern).startswith('gs://'):
      return original(pattern)
    return ['gs://' + os.path.relpath(p, root) for p in original(local(pattern))]

  with epath.testing.mock_epath(
      open=open_, exists=on_local, isdir=on_local, listdir=on_local, makedirs=on_local,
      mkdir=on_local, remove=on_local, rmtree=on_local, stat=on_local, walk=on_local,
      glob=glob, copy=two_paths, rename=two_paths, replace=two_paths):
    yield root
