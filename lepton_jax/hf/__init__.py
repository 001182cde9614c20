"""Hugging Face checkpoints in and out: `hf.load` a causal-LM directory, `hf.save` a lepton model.

A `*ForSequenceClassification` directory (Llama, Mistral, Qwen2, Qwen3, GPT-2) loads as the same
Transformer with the classify head (hf/classify.py), whose `model.apply(variables, tokens_BT)` is
[B, num_labels] logits; `hf.save` writes such a model back as its family's classifier.

  from lepton_jax import hf
  model, variables = hf.load('/path/to/Llama-3.2-1B')          # logits equal transformers'
  hf.save(model, variables, '/tmp/export', tokenizer=tokenizer)  # AutoModelForCausalLM loads it

Each family (llama, mistral, qwen2, qwen3, gpt2) maps its config.json and tensor names in its
own module; docs/hf.md lists which fields map to what. Needs the `hf` extra (safetensors).
"""
import dataclasses
import json
import os
import shutil

from etils import epath
from flax import traverse_util
import flax.linen as nn
import jax

from lepton_jax import adapters, config_lib, sharding, train_state, tree
from lepton_jax.data import tokenizers
from lepton_jax.hf import card, classify, family, gpt2, llama, mistral, peft, qwen2, qwen3
from lepton_jax.hf import tensors
from lepton_jax.model import ModelConfig, Transformer
from lepton_jax.model.config import LoraConfig, PeftConfig

FAMILIES = {f.model_type: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY,
                                      gpt2.FAMILY)}
# A checkpoint's dtype -> lepton's (float16 has no lepton compute path: it loads as float32).
DTYPES = {'float32': 'float32', 'bfloat16': 'bfloat16', 'float16': 'float32'}
MAX_SHARD_BYTES = 5 * 2**30  # transformers' historical default.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'tokenizer.model')


def read_config(path: str) -> tuple[family.Family, dict]:
  """(family, config.json) of a Hugging Face directory; raises naming what is missing."""
  config_file = epath.Path(path) / 'config.json'
  if not config_file.exists():
    raise FileNotFoundError(f'{config_file} does not exist: not a Hugging Face model directory')
  hf_config = json.loads(config_file.read_text())
  model_type = hf_config.get('model_type')
  if model_type not in FAMILIES:
    raise ValueError(f'{config_file}: model_type={model_type!r} is not supported; lepton reads '
                     f'{tuple(FAMILIES)}')
  return FAMILIES[model_type], hf_config


def architecture(path: str) -> dict:
  """The ModelConfig architecture fields of a Hugging Face directory (and the head fields of a
  classifier)."""
  hf_family, hf_config = read_config(path)
  return {**hf_family.read_config(hf_config), **classify.read_config(hf_config)}


def stored_dtype(hf_config: dict) -> str:
  """The lepton dtype of a checkpoint's weights (config.json `dtype`, formerly `torch_dtype`)."""
  stored = hf_config.get('dtype') or hf_config.get('torch_dtype') or 'float32'
  if stored not in DTYPES:
    raise ValueError(f'config.json field dtype={stored!r}: lepton reads {tuple(DTYPES)}')
  return DTYPES[stored]


def model_config(path: str, dtype: str | None = None, **run_fields) -> ModelConfig:
  """The ModelConfig of a Hugging Face directory: its architecture, lepton's defaults for how to
  run it (attention, scan_layers, remat, ...; `run_fields` override them), params and compute in
  `dtype` (None: the checkpoint's)."""
  hf_family, hf_config = read_config(path)
  fields = config_lib.model_config().to_dict()
  fields.update(run_fields)
  dtype = dtype or stored_dtype(hf_config)
  fields.update(hf_family.read_config(hf_config), **classify.read_config(hf_config),
                param_dtype=dtype, dtype=dtype)
  return ModelConfig(**fields)


def _mesh_or_default(mesh):
  return mesh or jax.make_mesh((1,) * len(sharding.MESH_AXES), sharding.MESH_AXES,
                               devices=jax.devices()[:1],
                               axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES))


def load(path: str, dtype: str | None = None, *, adapter: str | None = None,
         mesh: jax.sharding.Mesh | None = None, rules=config_lib.DEFAULT_RULES,
         **run_fields) -> tuple[Transformer, dict]:
  """(model, variables) of a Hugging Face causal-LM directory.

  `dtype` ('float32', 'bfloat16'; None: the checkpoint's) is the params' and compute dtype.
  `adapter`: a PEFT LoRA, AdaLoRA or prompt-tuning directory over this base; the model then
  carries it as lepton adapters (config.peft.method; lepton_jax/lora.py merges or switches LoRA's
  and AdaLoRA's). The variables are placed on `mesh` by
  `rules` (default: one device); each process reads only the slices its devices hold.
  `run_fields` set ModelConfig fields that do not change what the model computes (scan_layers,
  attention, remat).
  """
  cfg = model_config(path, dtype, **run_fields)
  if adapter is not None:
    cfg = peft.read_model_config(adapter, read_config(path)[0], cfg)
  model = Transformer(cfg)
  return model, load_variables(path, model, mesh, rules, adapter)


def load_tokenizer(path: str) -> tokenizers.HFTokenizer:
  """The tokenizer of a Hugging Face directory (as `data.tokenizer='hf'` builds it)."""
  return tokenizers.HFTokenizer(path)


def load_variables(path: str, model: Transformer, mesh=None, rules=config_lib.DEFAULT_RULES,
                   adapter: str | None = None) -> dict:
  """The variables of `model`, whose config must describe the checkpoint at `path` (and its
  adapters the PEFT directory `adapter`), on `mesh`."""
  hf_family, _ = read_config(path)
  cfg, mesh = model.cfg, _mesh_or_default(mesh)
  boxed = train_state.boxed_variables(model, seq_len=1)
  abstract = sharding.unbox_abstract(boxed)['params']
  shardings = sharding.param_shardings(boxed, mesh, rules)['params']
  params = tensors.plan_params(abstract, nn.get_partition_spec(boxed)['params'],
                               {**_tensor_maps(hf_family, cfg), **peft.tensors(hf_family, cfg)},
                               cfg.num_layers)
  is_adapter = lambda p: tree.matches(adapters.ADAPTERS, p.name)
  base = tensors.Checkpoint(epath.Path(path))
  base.check([p for p in params if not is_adapter(p)],
             hf_family.buffers + (('lm_head.weight',) if cfg.tie_embeddings else ()),
             cfg.num_layers)
  sources = {False: base}
  if any(is_adapter(p) for p in params):
    if adapter is None:
      raise ValueError(f'{path} holds no adapters: load the base without config.lora or '
                       'config.peft, or give a PEFT adapter directory')
    sources[True] = peft.adapter_source(adapter, cfg)
    sources[True].check([p for p in params if is_adapter(p)], (), cfg.num_layers)
  leaves = {p.name: tensors.load_array(sources[is_adapter(p)], p, shape.shape, shard,
                                       cfg.param_dtype)
            for p, shape, shard in zip(params, jax.tree.leaves(abstract),
                                       jax.tree.leaves(shardings))}
  return {'params': traverse_util.unflatten_dict(leaves, sep='/')}


def _tensor_maps(hf_family: family.Family, cfg: ModelConfig) -> dict:
  """lepton param path -> TensorMap: the family's, with the classify head's score."""
  maps = {**hf_family.tensors(cfg), **classify.tensors(cfg)}
  if cfg.head == 'classify':  # A classifier has no LM head.
    maps.pop('head/kernel', None)
  return maps


def _check_new_directory(target: epath.Path) -> None:
  if target.exists() and any(target.iterdir()):
    raise FileExistsError(f'{target} exists and is not empty; give a new directory')


def family_of(cfg: ModelConfig) -> tuple[family.Family, dict]:
  """The first family that expresses `cfg`, and its config.json fields; raises naming, for each
  family, the field that prevents it."""
  reasons = []
  for hf_family in FAMILIES.values():
    try:
      return hf_family, hf_family.write_config(cfg)
    except ValueError as error:
      reasons.append(str(error))
  raise ValueError('no Hugging Face family expresses this model: ' + '; '.join(reasons))


def save(model: Transformer, variables: dict, path: str, tokenizer=None, *,
         run: dict | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
         labels=None) -> None:
  """Writes `model` and `variables` as a Hugging Face directory at `path`.

  config.json, generation_config.json, safetensors (shards and the index above
  `max_shard_bytes`), the tokenizer's files when one is given and a README.md model card; `run`
  ({'config': ConfigDict, 'metrics': dict}) adds a run's training config and last metrics to the
  card; `labels` names a classify head's labels in config.json (id2label). `path` must not exist
  or be empty; everything is written to a temporary directory beside it
  first, so a failure leaves nothing behind.
  """
  cfg = model.cfg
  if cfg.lora.enabled:
    raise ValueError('hf.save: the model carries LoRA adapters; lora.merge(model, variables) '
                     'first, or hf.save_adapter(model, variables, path) for the adapters alone')
  if cfg.peft.method in ('houlsby', 'pfeiffer', 'prompt'):
    raise ValueError(f'hf.save: a Hugging Face model has no place for config.peft.method='
                     f'{cfg.peft.method!r} adapters, which do not merge into the kernels')
  if cfg.quant.weights != 'none':
    raise ValueError('hf.save writes float weights and these are int8: export the float model '
                     '(without config.quant), or write an int8 checkpoint with scripts/quantize.py')
  hf_family, hf_config = family_of(cfg)
  target = epath.Path(path)
  _check_new_directory(target)
  params = variables['params']
  values = tensors.leaves_by_name(params)
  plan = tensors.plan_params(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
                             nn.get_partition_spec(train_state.boxed_variables(model, 1))['params'],
                             _tensor_maps(hf_family, cfg), cfg.num_layers)
  if cfg.head == 'classify':
    hf_config = {**hf_config, **classify.write_config(hf_family.model_type, cfg, labels)}
  special, tokenizer_files = _special_ids(tokenizer), _tokenizer_files(tokenizer)
  staging = target.parent / f'.{target.name}.partial-{os.getpid()}'
  if jax.process_index() == 0:
    staging.mkdir(parents=True, exist_ok=True)
  try:
    tensors.write(staging, tensors.hf_tensors(plan), values, max_shard_bytes)
    if jax.process_index() == 0:
      dtype = str(jax.tree.leaves(params)[0].dtype)
      full_config = dict({'architectures': [hf_family.architecture], **hf_config},
                         model_type=hf_family.model_type, dtype=dtype, **special)
      (staging / 'config.json').write_text(json.dumps(full_config, indent=2))
      (staging / 'generation_config.json').write_text(json.dumps(special, indent=2))
      for source, name in tokenizer_files:
        source.copy(staging / name)
      (staging / 'README.md').write_text(card.model_card(hf_family, cfg, params, run))
      if target.exists():
        target.rmdir()
      staging.rename(target)
  finally:
    if jax.process_index() == 0 and staging.exists():
      shutil.rmtree(staging)


def save_adapter(model: Transformer, variables: dict, path: str) -> None:
  """Writes `model`'s LoRA, AdaLoRA (pruned as PEFT saves it, with its rank_pattern) or
  prompt-tuning adapters as a PEFT directory (adapter_config.json, adapter_model.safetensors)
  that `peft.PeftModel.from_pretrained(base, path)` loads."""
  cfg = model.cfg
  if cfg.peft.method in ('houlsby', 'pfeiffer'):
    raise ValueError(f'hf.save_adapter: PEFT has no format for config.peft.method='
                     f'{cfg.peft.method!r} (bottleneck) adapters; keep the lepton checkpoint')
  if not (cfg.lora.enabled or cfg.peft.virtual_tokens):
    raise ValueError('hf.save_adapter: the model has no LoRA adapters (config.lora.targets)')
  hf_family, _ = family_of(dataclasses.replace(cfg, lora=LoraConfig(), peft=PeftConfig()))
  target = epath.Path(path)
  _check_new_directory(target)
  adapter = adapters.adapter_of(variables['params'])
  plan = tensors.plan_params(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapter),
      adapters.adapter_of(nn.get_partition_spec(train_state.boxed_variables(model, 1))['params']),
      peft.tensors(hf_family, cfg), cfg.num_layers)
  adapter_config = peft.adapter_config(hf_family, cfg, adapter)
  if jax.process_index() == 0:
    target.mkdir(parents=True, exist_ok=True)
    (target / peft.CONFIG).write_text(json.dumps(adapter_config, indent=2))
  tensors.write(target, tensors.hf_tensors(plan), tensors.leaves_by_name(adapter), MAX_SHARD_BYTES,
                single=peft.WEIGHTS)
  if cfg.lora.svd and jax.process_index() == 0:
    peft.prune_file(target, adapter_config['rank_pattern'])


def _special_ids(tokenizer) -> dict:
  if tokenizer is None:
    return {}
  # bos written even when None: transformers' config classes default it (Llama's to 1) otherwise.
  return {'bos_token_id': tokenizer.bos_id, 'eos_token_id': tokenizer.eos_id}


def _tokenizer_files(tokenizer) -> list[tuple[epath.Path, str]]:
  """(source, name in the export) of a tokenizer's files: an hf tokenizer's directory, or a
  SentencePiece model (which lepton's 'hf' tokenizer reads back as tokenizer.model)."""
  if tokenizer is None:
    return []
  source = epath.Path(tokenizer.path) if tokenizer.path else None
  if source is not None and source.is_dir():
    return [(source / name, name) for name in TOKENIZER_FILES if (source / name).exists()]
  if source is not None and source.is_file():
    return [(source, 'tokenizer.model')]
  raise ValueError(f'hf.save: a {type(tokenizer).__name__} has no files to save as a Hugging Face '
                   'tokenizer')
