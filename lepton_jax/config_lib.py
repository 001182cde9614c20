"""The shared defaults every experiment config starts from, and their validation.

An experiment is one file in configs/ whose `get_config(arg)` calls `base_config()` and changes
what it varies. Code reads the config at the top (train.py, model constructors) and passes plain
values down.
"""
import importlib.util
import json

from etils import epath
import ml_collections

from lepton_jax import adapters, data, generate, objectives, optim
from lepton_jax.kernels import attention as attention_kernels
from lepton_jax.model import attention, layers, transformer
from lepton_jax.model.config import LORA_INITS, PruneConfig, QuantConfig
from lepton_jax.model import config as model_fields

# Logical axis -> mesh axes (t5x/MaxText style). Three shipped sets; pick one in a config with
# `config.mesh.rules = config_lib.RULE_SETS[name]` or write your own table.
# Names every set leaves whole: splitting these would cut a head, a sequence or the layer stack.
UNSPLIT = (('head_dim', None), ('length', None), ('layers', None), ('act_embed', None))
# fsdp: ZeRO-3. Weights, gradients and optimizer state split along 'embed'; batch over data x fsdp.
FSDP_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
)
# tensor: Megatron. Column-split q/k/v, up and gate (their output axes 'heads', 'kv_heads',
# 'mlp'), row-split out and down (the same names as input axes), vocab split for embedding and
# head; activations inside attention and the MLP stay split; batch over data only.
TENSOR_RULES = (
    ('batch', 'data'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('vocab', 'tensor'),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
)
# fsdp_tensor: both. The default, because a mesh axis of size 1 splits nothing: the same table
# serves pure data parallel, FSDP, tensor parallel and their mixes.
FSDP_TENSOR_RULES = FSDP_RULES + TENSOR_RULES[1:]
RULE_SETS = {'fsdp': FSDP_RULES + UNSPLIT, 'tensor': TENSOR_RULES + UNSPLIT,
             'fsdp_tensor': FSDP_TENSOR_RULES + UNSPLIT}
DEFAULT_RULES = RULE_SETS['fsdp_tensor']
# Written into every workdir by lepton-train (and into int8 checkpoints): the resolved config.
RUN_CONFIG = 'config.json'


def read_run_config(workdir: str) -> ml_collections.ConfigDict | None:
  """WORKDIR/config.json (a run's, an int8 or a pruned checkpoint's), or None where there is none."""
  file = epath.Path(workdir) / RUN_CONFIG
  return ml_collections.ConfigDict(json.loads(file.read_text())) if file.exists() else None


def model_config() -> ml_collections.ConfigDict:
  """Llama-style defaults; GPT-2, Mistral and Qwen2 are other settings of the same fields."""
  return ml_collections.ConfigDict(dict(
      vocab_size=0,  # 0: take the tokenizer's vocab size.
      d_model=256,
      num_layers=4,
      num_heads=4,
      num_kv_heads=4,  # == num_heads: MHA; 1: MQA; in between: GQA.
      head_dim=64,
      d_ff=1024,
      mlp='swiglu',  # swiglu | geglu | gelu | relu
      norm='rmsnorm',  # rmsnorm | layernorm
      norm_eps=1e-5,
      positions='rope',  # rope | learned | none
      rope_theta=10_000.0,
      # none | llama3: Llama 3.1's long-context rescaling of the rope frequencies, with the
      # four values below (those of Llama 3.1/3.2 shown).
      rope_scaling='none',
      rope_scaling_factor=8.0,
      rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0,
      rope_original_max_len=8192,
      max_seq_len=2048,  # Rows of the learned position table; the longest seq_len allowed.
      sliding_window=0,  # 0: full causal attention; W: attend to the last W positions (Mistral).
      qkv_bias=False,
      out_bias=False,
      mlp_bias=False,
      tie_embeddings=False,
      qk_norm=False,
      dropout=0.0,
      # xla: einsum + softmax; dot_product: jax.nn.dot_product_attention (picks cuDNN flash on
      # GPU where it applies); cudnn: insist on the cuDNN kernel; splash: the TPU Pallas
      # kernel; auto: splash on TPU, dot_product on GPU, xla on CPU (model/attention.py).
      attention='xla',
      # splash: the kernel's query and key blocks (clamped to the sequence length;
      # multiples of 128). MaxText's defaults; tune per TPU generation on the chip.
      attention_block_q=512,
      attention_block_kv=512,
      scan_layers=False,
      remat='none',  # none | full | dots | dots_no_batch | dots_no_batch_attention
      param_dtype='float32',
      dtype='float32',  # compute dtype: activations and matmul inputs.
      # lm: next-token logits. classify: a `score` Dense [d_model, num_labels] on one hidden
      # state per row (pool: last, the rightmost token that is not pad_id, as transformers; or
      # mean over those), trained by config.objective='classify'.
      head='lm',
      num_labels=0,  # classify; 0: len(config.data.labels).
      pool='last',
      pad_id=-1,  # classify: the id that pads rows; -1: the tokenizer's eos id.
  ))


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 1000
  config.batch_size = 16  # Global, across all processes and devices.
  config.seq_len = 128
  config.grad_accum_steps = 1  # Micro-batches per step; batch_size must divide evenly.
  config.z_loss = 0.0  # Weight of log(Z)^2 (PaLM); 1e-4 stabilises large bf16 runs.
  # What a step minimises (lepton_jax/objectives.py). lm: cross-entropy on every target token.
  # sft: on the loss tokens of task records (data.source='jsonl': completions, assistant turns).
  # Both are normalised per counted token over the global batch, micro-batches of
  # grad_accum_steps included. distill: knowledge distillation from config.distill.teacher
  # (below) mixed with the data's. classify: cross-entropy of the classify head (model.head) on
  # data.format='classification' records, per record. dpo: Direct Preference Optimization on
  # data.format='preference' pairs (config.dpo), per pair.
  config.objective = 'lm'
  # dpo: the loss (sigmoid: DPO, ipo: IPO, robust: rDPO), its beta and label smoothing (cDPO
  # with sigmoid, rDPO's noise rate with robust), as TRL's DPOTrainer. The reference is the
  # starting policy: with LoRA the base with the adapters off, otherwise a frozen copy.
  # precompute_ref_log_probs (TRL's name): run the reference once over the train and eval pairs
  # before the first step (and at each resume) and feed its log-probs with the batches; a full
  # model then keeps no frozen copy of its params (lepton_jax/dpo_reference.py).
  config.dpo = ml_collections.ConfigDict(dict(loss='sigmoid', beta=0.1, label_smoothing=0.0,
                                              precompute_ref_log_probs=False))
  config.log_every_steps = 10
  config.eval_every_steps = 200
  config.eval_batches = 8
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  # Params that train: regular expressions over param names such as 'layers_0/attn/query/kernel'
  # ('layers/...' with scan_layers); a param trains if any matches its whole name. The others,
  # and every variable outside `params`, are frozen: read, never given a gradient or an
  # optimizer state, and checkpointed once per run.
  config.trainable = ('.*',)
  # Start from trained weights instead of a random init: 'hf:DIR' (a Hugging Face causal-LM
  # directory) or 'workdir:DIR[:STEP]' (another lepton run). The model's architecture fields and
  # the tokenizer then come from there (lepton_jax/pretrained.py).
  config.init_from = ''
  # A step whose loss, gradient norm or update is not finite. stop: the run ends with an error
  # naming it, before its state is saved (the checkpoint before it stays the latest). skip: the
  # update is dropped, counted (train/skipped_steps), and the run ends after
  # max_consecutive_skips such steps in a row.
  config.nonfinite = 'stop'
  config.max_consecutive_skips = 10

  # Looking into a run (lepton_jax/monitor.py). Memory, step and data-wait figures, per-event
  # times and goodput are always logged (a few clock reads per step); these switch on the rest.
  # A jax.profiler trace of steps start_step .. start_step + num_steps - 1 (never a compiling
  # step) into dir ('' = WORKDIR/profile), for TensorBoard's profile plugin, xprof or Perfetto.
  config.profile = ml_collections.ConfigDict(dict(
      start_step=10,
      num_steps=0,  # 0: no profile.
      dir='',
      all_processes=False,  # False: process 0 only.
  ))
  # > 0: when no step finishes for this many seconds (after the first), every thread's Python
  # stack goes to the log and WORKDIR/hangs/; with hang_exit the run then exits with status 75
  # (monitor.HANG_EXIT_CODE) so a scheduler restarts it. Allow for evaluation and checkpoints.
  config.hang_timeout_s = 0.0
  config.hang_exit = False
  # A loss whose robust z-score over the previous `window` losses exceeds `threshold` is logged,
  # with its batch's data position and gradient norm, to WORKDIR/timeline.jsonl. window 0: off.
  config.loss_spike = ml_collections.ConfigDict(dict(window=100, threshold=6.0))
  # A Weights & Biases run beside metrics.jsonl and TensorBoard when project is set (the wandb
  # extra); mode: online | offline (no network; `wandb sync` later) | disabled.
  config.wandb = ml_collections.ConfigDict(dict(project='', entity='', mode='online'))

  config.model = model_config()

  # Low-rank adapters (lepton_jax/lora.py): set targets to train adapters on a frozen base;
  # config.trainable left at its default then means the adapters alone.
  config.lora = ml_collections.ConfigDict(dict(
      # q k v o gate up down (shorthands), 'all-linear', or regexes over Dense module paths.
      targets=(),
      rank=8,
      alpha=16.0,  # Scale alpha / rank (alpha / sqrt(rank) with rslora).
      dropout=0.0,  # On the adapter's input.
      rslora=False,
      dora=False,  # Weight-decomposed LoRA (Liu et al. 2024): a learned magnitude per column.
      init='kaiming',  # kaiming | gaussian: how A starts; B starts at zero.
      plus_ratio=1.0,  # LoRA+: B's learning rate / A's (the paper suggests ~16).
  ))

  # Which parameter-efficient method trains (lepton_jax/adapters.py; README's table has a command
  # for each): lora and adalora adapt config.lora.targets, houlsby and pfeiffer add bottleneck
  # adapters to every block, prompt learns virtual tokens. All freeze the base, checkpoint the
  # adapters alone and leave a fresh model's logits unchanged.
  config.peft = ml_collections.ConfigDict(dict(
      method='lora',
      # adalora (Zhang et al. 2023): config.lora.rank is each matrix's initial rank; singular
      # values are pruned to target_rank per matrix on average over all of them: none for
      # tinit steps, then on a cubic schedule every delta_t steps until tfinal steps remain, the
      # last of which keep the final ranks (written to WORKDIR/adalora_ranks.json).
      target_rank=8,
      tinit=0,
      tfinal=1,
      delta_t=1,
      beta1=0.85,  # EMA of the sensitivity |w * grad|,
      beta2=0.85,  # and of its uncertainty.
      orth_reg_weight=0.5,  # Of ||P^T P - I||_F + ||Q Q^T - I||_F, averaged over matrices.
      # houlsby | pfeiffer: the adapters' hidden width and nonlinearity.
      bottleneck=16,
      activation='relu',
      # prompt: how many virtual tokens, initialised from random tokens' embeddings or N(0, .02).
      num_virtual_tokens=20,
      prompt_init='vocab',
  ))

  # int8 quantization (lepton_jax/quant.py), applied when a model is loaded for evaluation,
  # sampling, generation or export (scripts/quantize.py writes an int8 checkpoint); a trained
  # run's checkpoint is never modified. In lepton-train: the frozen base of a LoRA run started
  # from config.init_from (QLoRA), or with qat, the scheme the float weights train through.
  config.quant = ml_collections.ConfigDict(dict(
      weights='none',  # none | int8: every Dense but the output head, unless excluded.
      granularity='channel',  # Of the weight scales: channel | tensor | group.
      group_size=128,  # group: consecutive inputs of a Dense (its input dims flattened) per scale.
      activations='none',  # none | int8: W8A8, activations quantized dynamically.
      activation_granularity='token',  # token | tensor
      kv_cache='none',  # none | int8: a scale per (token, kv head).
      embed=False,  # The embedding table too (per row); with tied embeddings, the head with it.
      head=False,  # The output head too (the most sensitive matmul).
      exclude=(),  # Regular expressions over Dense paths ('layers_0/mlp/down') left in float.
      kernel='auto',  # auto: Pallas on TPU and GPU, XLA elsewhere | xla | pallas
      # Quantization-aware training: lepton-train trains the float weights through the int8
      # scheme above (straight-through gradients); loading the run quantizes them to it.
      qat=False,
  ))

  # Pruning (lepton_jax/prune.py). Each method keeps bool masks (the `prune` collection, saved
  # with every checkpoint), so pruned weights stay exactly zero while training: lepton-train
  # prunes at begin_step (one_shot) or on Zhu & Gupta's cubic ramp (gradual), scripts/prune.py
  # prunes a trained run once. magnitude and n:m mask the Dense layers of `layers`; heads and ffn
  # remove whole attention heads or FFN channels, the same number in every layer: scripts/prune.py
  # writes the smaller model (fewer num_heads, smaller d_ff), which trains and loads like any
  # other, from a dense run or from one lepton-train pruned (its zeroed units go).
  config.prune = ml_collections.ConfigDict(dict(
      method='none',  # none | magnitude | n:m | heads | ffn
      scope='layer',  # magnitude: layer (each Dense to `sparsity`) | global (one threshold)
      sparsity=0.5,  # magnitude, heads, ffn: the fraction removed, in [0, 1).
      n=2,  # n:m: n of every m consecutive inputs of a Dense kept (2:4, as sparse tensor cores).
      m=4,
      importance='norm',  # heads, ffn: norm (of the unit's weights) | taylor (scripts/prune.py)
      importance_batches=4,  # taylor: training batches whose gradients it sums.
      schedule='one_shot',  # one_shot | gradual (not n:m: the sparsity ramps over the steps below)
      begin_step=0,  # one_shot: the step that prunes; gradual: the first mask update...
      end_step=0,  # ...and the last, which reaches `sparsity`,
      every_steps=100,  # every this many steps, from initial_sparsity:
      initial_sparsity=0.0,  # s_t = s + (s_0 - s) (1 - (t - begin) / (end - begin))^3.
      layers=(r'layers(_\d+)?/.*',),  # magnitude, n:m: regexes over Dense paths (not the head).
  ))

  # Knowledge distillation (config.objective='distill', lepton_jax/distill.py): per counted token
  # the student minimises alpha T^2 KL(teacher_T || student_T) + (1 - alpha) cross-entropy
  # (Hinton et al. 2015), softmaxes at temperature T. The teacher, of any shape but sharing the
  # student's tokenizer, is frozen and runs in the same step on the same mesh.
  config.distill = ml_collections.ConfigDict(dict(
      teacher='',  # workdir:DIR[:STEP] (a lepton run) | hf:DIR (a Hugging Face model)
      temperature=2.0,
      alpha=0.5,  # The KL's weight; 1 - alpha the data cross-entropy's.
      top_k=0,  # k > 0: the KL over the teacher's k likeliest tokens (both renormalised there).
      teacher_dtype='float32',  # float32 | bfloat16: the teacher's params and compute.
      teacher_quant='none',  # none | int8: the teacher's weights int8 per channel.
  ))

  config.data = ml_collections.ConfigDict(dict(
      source='stdlib',  # stdlib | text | jsonl | tfds
      path='',  # text, jsonl: a file, a directory or a glob.
      tfds_name='',  # tfds: dataset name, e.g. 'lm1b'.
      tfds_data_dir='',  # tfds: where prepared data lives ('' = TFDS default).
      train_split='train',  # tfds split names
      eval_split='test',
      text_key='text',  # tfds feature holding the text
      val_fraction=0.1,  # stdlib/text: share held out for validation.
      # stdlib: fnmatch patterns over library-relative paths ('email/*'); include () = all.
      include=(),
      exclude=(),
      tokenizer='sentencepiece',  # sentencepiece | bytes | hf
      # sentencepiece: an existing .model; '' trains one (cached in the workdir). hf: a Hugging
      # Face directory (tokenizer.json or tokenizer.model; bos/eos ids from its config files).
      tokenizer_path='',
      vocab_size=1024,  # sentencepiece vocabulary to train.
      spm_train_chars=20_000_000,  # Text fed to the sentencepiece trainer (cap).
      # False: tokenize the whole train split up front (small corpora; every token is a target
      # exactly once per epoch). True: shuffle documents and tokenize and pack them as training
      # reads them, for corpora too large to tokenize in memory (C4 and up).
      streaming=False,
      read_threads=4,  # streaming: threads reading and tokenizing documents ahead of training.
      # streaming: rows are shuffled within windows of this many, so that a batch does not hold
      # consecutive rows of a few long documents. 0 keeps the packed order.
      shuffle_window=1024,
      # jsonl: task records, one JSON object per line (lepton_jax/data/formats.py): text |
      # prompt_completion | chat | classification | preference.
      format='text',
      labels=(),  # classification: the label names (or ids) a record's label is one of.
      # jsonl: examples kept whole, several to a row with segment ids (attention stays within an
      # example, positions restart); False: one example per row, padded to seq_len.
      packing=True,
      truncate='right',  # jsonl: which end of an example longer than seq_len + 1 is cut (counted).
      # Language-model rows (windows of the document stream): attention stays within a document
      # and positions restart after every eos (segment ids, as packed task rows have). Off:
      # a row attends across the documents it holds. Off for the CPU configs: a [B, T, T] mask
      # per row instead of one causal mask (docs/benchmarks.md); on in the TPU configs.
      document_masking=False,
      # Cleaning of the train split, as it is read: steps=('exact_dedup', 'near_dedup',
      # 'decontaminate', 'pii', 'quality') in any order and subset; each one's options beside.
      filters=data.filters.default_config(),
  ))

  config.optimizer = ml_collections.ConfigDict(dict(
      name='adamw',  # adamw | adafactor | sgd
      learning_rate=1e-3,
      schedule='cosine',  # cosine | linear | wsd (warmup, constant, linear cooldown)
      warmup_steps=100,
      cooldown_steps=0,  # wsd: length of the final linear decay to min_lr_ratio.
      min_lr_ratio=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      momentum=0.9,  # sgd
      weight_decay=0.1,
      decay_embeddings=False,  # Norms and biases never decay.
      clip_norm=1.0,  # 0 disables global-norm clipping.
  ))

  config.mesh = ml_collections.ConfigDict(dict(
      data=-1,  # -1: all devices not used by the other axes (within one slice).
      fsdp=1,
      tensor=1,
      # Multi-slice TPU (hybrid mesh): how many slices each axis spans over the data-center
      # network. Mesh axis sizes are then dcn_x * x; keep collectives-heavy axes (tensor, fsdp)
      # inside a slice and span slices with data.
      dcn_data=1,
      dcn_fsdp=1,
      dcn_tensor=1,
      rules=DEFAULT_RULES,
  ))

  # The sample at the end of training and scripts/sample.py (lepton_jax/generate.py draws it).
  # The prompt follows a document boundary; num_tokens (0: none) must fit the model's
  # max_seq_len positions after it. temperature 0 is greedy; top_k 0, top_p 1, min_p 0 are off.
  config.sample = ml_collections.ConfigDict(dict(
      prompt='',
      num_tokens=200,
      temperature=0.8,
      top_k=40,
      top_p=1.0,
      min_p=0.0,
      seed=0,  # Sample i of a batch draws from fold_in(key(seed), i).
  ))

  # Evaluators that run during training besides the validation loss (which logs eval/loss,
  # eval/perplexity, eval/accuracy and eval/bits_per_byte every eval_every_steps steps), each
  # under eval/NAME/...: config.evals.NAME = dict(type=..., every=..., ...). The types and their
  # options are in lepton_jax/evals/evaluators.py; lepton-eval runs them all.
  config.evals = ml_collections.ConfigDict()
  return config


def llama_c4_pretraining(slice_mesh: dict, batch_size: int,
                         seq_len: int) -> ml_collections.ConfigDict:
  """What the Llama pretraining configs share; each then sets its model's shape and cadence.

  C4 streamed from a prepared TFDS dataset with a 32k vocabulary, documents masked from each
  other within a row, bf16 compute over scanned layers with attention='auto' (the splash kernel
  on TPU: memory linear in the sequence), z-loss, AdamW at 3e-4, and the given slice's mesh and
  global batch.
  """
  config = base_config()
  config.batch_size = batch_size
  config.seq_len = seq_len
  config.z_loss = 1e-4
  config.log_every_steps = 50
  config.eval_batches = 16
  config.checkpoint_every_steps = 1000

  config.data.source = 'tfds'
  config.data.tfds_name = 'c4/en'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.vocab_size = 32_000
  config.data.streaming = True  # C4 is far too big to tokenize up front.
  config.data.document_masking = True  # As MaxText and Levanter: no attention across documents.

  config.model.update(vocab_size=32_000, max_seq_len=seq_len, scan_layers=True,
                      attention='auto', dtype='bfloat16')
  config.optimizer.update(learning_rate=3e-4, warmup_steps=2000, weight_decay=0.1)
  config.mesh.update(slice_mesh)
  return config


OBJECTIVES = ('lm', 'sft', 'distill', 'classify', 'dpo')  # config.objective
# The data.format each objective trains on (data.source='jsonl').
OBJECTIVE_FORMATS = {'lm': data.TOKENIZED_FORMATS, 'sft': data.TOKENIZED_FORMATS,
                     'distill': data.TOKENIZED_FORMATS, 'classify': ('classification',),
                     'dpo': ('preference',)}
# Names come from the tables that the implementing code dispatches on.
CHOICES = {
    'model.mlp': tuple(transformer.ACTIVATIONS),
    'model.norm': tuple(layers.NORMS),
    'model.positions': transformer.POSITIONS,
    'model.rope_scaling': attention.ROPE_SCALINGS,
    'model.attention': attention.IMPLEMENTATIONS,
    'model.remat': ('none', *transformer.REMAT_POLICIES),
    'model.param_dtype': transformer.DTYPES,
    'model.dtype': transformer.DTYPES,
    'model.head': model_fields.HEADS,
    'model.pool': model_fields.POOLS,
    'data.source': tuple(data.SOURCES),
    'data.tokenizer': tuple(data.TOKENIZERS),
    'data.format': data.FORMATS,
    'data.truncate': ('left', 'right'),
    'objective': OBJECTIVES,
    'dpo.loss': objectives.DPO_LOSSES,
    'optimizer.name': optim.OPTIMIZERS,
    'optimizer.schedule': optim.SCHEDULES,
    'nonfinite': ('stop', 'skip'),  # What train.NonFiniteGuard does with a non-finite step.
    'lora.init': LORA_INITS,
    'peft.method': model_fields.PEFT_METHODS,
    'peft.activation': model_fields.ADAPTER_ACTIVATIONS,
    'peft.prompt_init': model_fields.PROMPT_INITS,
    'quant.weights': model_fields.QUANT_WEIGHTS,
    'quant.granularity': model_fields.QUANT_GRANULARITIES,
    'quant.activations': model_fields.QUANT_ACTIVATIONS,
    'quant.activation_granularity': model_fields.QUANT_ACTIVATION_GRANULARITIES,
    'quant.kv_cache': model_fields.QUANT_KV_CACHES,
    'quant.kernel': model_fields.QUANT_KERNELS,
    'prune.method': model_fields.PRUNE_METHODS,
    'prune.scope': model_fields.PRUNE_SCOPES,
    'prune.importance': model_fields.PRUNE_IMPORTANCES,
    'prune.schedule': model_fields.PRUNE_SCHEDULES,
    'distill.teacher_dtype': transformer.DTYPES,
    'distill.teacher_quant': model_fields.QUANT_WEIGHTS,
    'wandb.mode': ('online', 'offline', 'disabled'),
}
POSITIVE = ('total_steps', 'batch_size', 'seq_len', 'grad_accum_steps', 'log_every_steps',
            'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
            'max_consecutive_skips', 'model.d_model',
            'model.num_layers', 'model.num_heads', 'model.num_kv_heads', 'model.head_dim',
            'model.d_ff', 'model.max_seq_len', 'data.read_threads')


def _get(config: ml_collections.ConfigDict, dotted: str):
  for part in dotted.split('.'):
    config = config[part]
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks that need no devices or data; raises ValueError naming the offending key."""
  for key, choices in CHOICES.items():
    if _get(config, key) not in choices:
      raise ValueError(f'config.{key}={_get(config, key)!r}: expected one of {choices}')
  for key in POSITIVE:
    if _get(config, key) <= 0:
      raise ValueError(f'config.{key}={_get(config, key)!r}: must be positive')
  m = config.model
  if config.seq_len > m.max_seq_len:
    raise ValueError(f'config.seq_len={config.seq_len} exceeds config.model.max_seq_len='
                     f'{m.max_seq_len}, the longest sequence the model has positions for')
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by '
                     f'config.grad_accum_steps={config.grad_accum_steps}')
  if m.num_heads % m.num_kv_heads:
    raise ValueError(f'config.model.num_heads={m.num_heads} is not a multiple of '
                     f'config.model.num_kv_heads={m.num_kv_heads}')
  if m.positions == 'rope' and m.head_dim % 2:
    raise ValueError(f'config.model.head_dim={m.head_dim} must be even for rope')
  if m.dropout and m.attention != 'xla':
    raise ValueError(f'config.model.dropout={m.dropout} needs config.model.attention="xla" '
                     f'(fused attention kernels have no attention dropout)')
  lanes = attention_kernels.LANES
  if m.attention_block_q % lanes or m.attention_block_kv % lanes or min(
      m.attention_block_q, m.attention_block_kv) <= 0:
    raise ValueError(f'config.model.attention_block_q={m.attention_block_q} and attention_block_kv='
                     f'{m.attention_block_kv} must be positive multiples of {lanes}')
  if config.data.shuffle_window < 0:
    raise ValueError(f'config.data.shuffle_window={config.data.shuffle_window}: must be >= 0 '
                     '(0 keeps the packed order)')
  validate_task_data(config)
  data.filters.validate(config)
  validate_monitoring(config)
  if config.lora.targets and config.lora.rank <= 0:
    raise ValueError(f'config.lora.rank={config.lora.rank}: must be positive when '
                     'config.lora.targets is set')
  if not 0.0 <= config.lora.dropout < 1.0 or config.lora.plus_ratio <= 0:
    raise ValueError('config.lora.dropout must be in [0, 1) and config.lora.plus_ratio positive')
  if m.vocab_size < 0 or not 0.0 <= m.dropout < 1.0:
    raise ValueError('config.model.vocab_size must be >= 0 and config.model.dropout in [0, 1)')
  adapters.validate(config)
  QuantConfig.from_config(config.quant).check(m.tie_embeddings)
  PruneConfig.from_config(config.prune).check()
  validate_distill(config)
  validate_sample(config.sample, m.max_seq_len)


def validate_distill(config: ml_collections.ConfigDict) -> None:
  """config.distill, when config.objective='distill'."""
  if config.objective != 'distill':
    return
  d = config.distill
  if not d.teacher:
    raise ValueError("config.objective='distill' needs config.distill.teacher: "
                     "'workdir:DIR[:STEP]' (a lepton run) or 'hf:DIR'")
  if d.temperature <= 0:
    raise ValueError(f'config.distill.temperature={d.temperature}: must be positive')
  if not 0.0 <= d.alpha <= 1.0:
    raise ValueError(f'config.distill.alpha={d.alpha}: must be in [0, 1]')
  if d.top_k < 0:
    raise ValueError(f'config.distill.top_k={d.top_k}: must be >= 0 (0: every token)')


def validate_monitoring(config: ml_collections.ConfigDict) -> None:
  """config.profile, config.hang_timeout_s and config.loss_spike."""
  if config.profile.num_steps < 0 or config.profile.start_step < 1:
    raise ValueError(f'config.profile: start_step={config.profile.start_step} must be >= 1 and '
                     f'num_steps={config.profile.num_steps} >= 0 (0: no profile)')
  if config.hang_timeout_s < 0:
    raise ValueError(f'config.hang_timeout_s={config.hang_timeout_s}: must be >= 0 (0: no '
                     'watchdog)')
  if config.loss_spike.window and (config.loss_spike.window < 3 or
                                   config.loss_spike.threshold <= 0):
    raise ValueError(f'config.loss_spike: window={config.loss_spike.window} must be 0 (off) or '
                     f'>= 3, and threshold={config.loss_spike.threshold} positive')


def validate_task_data(config: ml_collections.ConfigDict) -> None:
  """config.objective against the data it trains on (data.source='jsonl', data.format)."""
  d = config.data
  document_masking = d.get('document_masking', False)  # A run config from before the key.
  if document_masking and d.source == 'jsonl':
    raise ValueError("config.data.document_masking=True is for language-model text; jsonl task "
                     "records keep examples apart with config.data.packing")
  if document_masking and config.model.attention == 'cudnn':
    raise ValueError("config.data.document_masking=True needs segment ids in attention, which "
                     "config.model.attention='cudnn' cannot take; use 'xla', 'dot_product', "
                     "'splash' or 'auto'")
  if config.objective == 'sft' and d.source != 'jsonl':
    raise ValueError(f"config.objective='sft' trains on the loss tokens of task records: set "
                     f"config.data.source='jsonl' (got {d.source!r})")
  if (config.objective == 'classify') != (config.model.head == 'classify'):
    raise ValueError(f'config.model.head={config.model.head!r} with config.objective='
                     f"{config.objective!r}: the classify objective trains the classify head, "
                     "and only it; set both or neither")
  if config.objective in ('classify', 'dpo') and d.source != 'jsonl':
    raise ValueError(f'config.objective={config.objective!r} trains on task records: set '
                     f"config.data.source='jsonl' and config.data.format="
                     f"{OBJECTIVE_FORMATS[config.objective][0]!r} (got source {d.source!r})")
  if d.source != 'jsonl':
    return
  if d.format not in OBJECTIVE_FORMATS[config.objective]:
    raise ValueError(f'config.data.format={d.format!r} is not what config.objective='
                     f'{config.objective!r} trains on; use one of '
                     f'{OBJECTIVE_FORMATS[config.objective]}')
  if d.format == 'classification' and not d.labels:
    raise ValueError("config.data.labels is empty: data.format='classification' needs the label "
                     'list (names or ids) that records label with')
  dpo = config.dpo
  if config.objective == 'dpo' and (dpo.beta <= 0 or not 0 <= dpo.label_smoothing < 0.5):
    raise ValueError(f'config.dpo.beta={dpo.beta} must be positive and config.dpo.'
                     f'label_smoothing={dpo.label_smoothing} in [0, 0.5)')
  if d.streaming:
    raise ValueError("config.data.streaming=True: jsonl task records are read and packed up "
                     "front; set it to False")
  if config.model.attention == 'cudnn' and d.packing:
    raise ValueError("config.data.packing=True needs segment ids in attention, which "
                     "config.model.attention='cudnn' cannot take; use 'xla' or 'dot_product'")


def validate_sample(sample: ml_collections.ConfigDict, max_seq_len: int) -> None:
  """config.sample; whether its prompt fits too needs the tokenizer (sample.check_fits)."""
  if not 0 <= sample.num_tokens <= max_seq_len:
    raise ValueError(f'config.sample.num_tokens={sample.num_tokens}: must be in [0, '
                     f'config.model.max_seq_len={max_seq_len}] (0: no sample)')
  try:
    generate.check_sampling(sample.temperature, sample.top_k, sample.top_p, sample.min_p)
  except ValueError as e:
    raise ValueError(f'config.sample.{e}') from None


def resolve_vocab(model_config: ml_collections.ConfigDict, tokenizer,
                  labels=()) -> ml_collections.ConfigDict:
  """The model config with vocab_size filled in from the tokenizer, or checked against it, and
  the classify head's pad_id (the tokenizer's eos id) and num_labels (len(labels)) where unset."""
  model_config = ml_collections.ConfigDict(model_config.to_dict())
  if model_config.pad_id < 0:
    model_config.pad_id = tokenizer.eos_id
  if model_config.head == 'classify' and not model_config.num_labels:
    model_config.num_labels = len(labels)
  if not model_config.vocab_size:
    model_config.vocab_size = tokenizer.vocab_size
  elif tokenizer.vocab_size > model_config.vocab_size:
    raise ValueError(f'the tokenizer has {tokenizer.vocab_size} tokens but '
                     f'config.model.vocab_size={model_config.vocab_size}')
  return model_config


def load_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config(ARG)` of a config file given as FILE.py[:ARG], as --config reads it."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('lepton_jax_config_file', path)
  if module_spec is None or not path.endswith('.py'):
    raise FileNotFoundError(f'config {spec!r}: {path} is not a Python config file')
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except FileNotFoundError:
    raise FileNotFoundError(f'config {spec!r}: {path} does not exist') from None
  return module.get_config(arg) if arg else module.get_config()


def override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted keys set (`{'model.mlp': 'gelu'}`), as --config.KEY=VALUE
  sets them: a key that names no field, or a value of the wrong type, is a ValueError naming it."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    target = config
    try:
      for parent in parents:
        target = target[parent]
      if leaf not in target:
        raise KeyError(leaf)
      target[leaf] = value
    except (KeyError, AttributeError, TypeError) as e:
      reason = 'names no field' if not isinstance(e, TypeError) else f'has the wrong type ({e})'
      raise ValueError(f'config.{key}={value!r} {reason}') from None
  return config
