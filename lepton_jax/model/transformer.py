"""The decoder-only Transformer: embeddings, a stack of pre-norm blocks, the output head.

One set of fields expresses GPT-2 (layernorm, learned positions, gelu, biases, tied embeddings)
and Llama 2/3, Mistral, Qwen2 (rmsnorm, rope, swiglu, GQA, qkv bias for Qwen2).
Shape suffixes (`x_BTD`) use the letters of the legend in lepton_jax/model/__init__.py.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lepton_jax.kernels import attention as attention_kernels
from lepton_jax.model import attention, bottleneck, hooks, layers, prompt
from lepton_jax.model.config import ModelConfig

REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # dots_no_batch, and the splash kernel's output and logsumexp, so that the backward pass
    # does not run the kernel's forward again.
    'dots_no_batch_attention': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        jax.checkpoint_policies.save_only_these_names(attention_kernels.RESIDUAL_NAME)),
}
ACTIVATIONS = {
    'swiglu': nn.silu, 'geglu': lambda x: nn.gelu(x, approximate=True),
    'gelu': lambda x: nn.gelu(x, approximate=True), 'relu': nn.relu,
}
GATED_MLPS = ('swiglu', 'geglu')
POSITIONS = ('rope', 'learned', 'none')  # rope acts in attention, learned adds a table here.
DTYPES = ('float32', 'bfloat16')  # for param_dtype and the compute dtype.


class Mlp(nn.Module):
  """Feed-forward: act(x W_up) W_down, or act(x W_gate) * (x W_up) W_down when gated.

  Hook points as TransformerLens's: hook_pre (act's input: x W_gate when gated, else x W_up),
  hook_pre_linear (x W_up when gated), hook_post (what W_down multiplies).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.cfg
    dense = lambda features, in_axes, out_axes, name: layers.Dense(
        (features,), in_axes=in_axes, out_axes=out_axes, use_bias=cfg.mlp_bias,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, lora=cfg.lora, quant=cfg.quant,
        prune=cfg.prune, deterministic=deterministic, name=name)
    act, gated = ACTIVATIONS[cfg.mlp], cfg.mlp in GATED_MLPS
    hook = lambda name, x: hooks.point(self, name, x)
    h_BTF = hook('hook_pre_linear' if gated else 'hook_pre',
                 dense(cfg.d_ff, ('embed',), ('mlp',), 'up')(x_BTD))
    if gated:
      h_BTF = act(hook('hook_pre', dense(cfg.d_ff, ('embed',), ('mlp',), 'gate')(x_BTD))) * h_BTF
    else:
      h_BTF = act(h_BTF)
    h_BTF = hook('hook_post', h_BTF)
    h_BTF = nn.with_logical_constraint(h_BTF, ('batch', 'length', 'act_mlp'))
    h_BTF = nn.Dropout(cfg.dropout)(h_BTF, deterministic=deterministic)
    return dense(cfg.d_model, ('mlp',), ('embed',), 'down')(h_BTF)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

  Hook points: hook_resid_pre, ln1.hook_normalized (attention's input), hook_attn_out,
  hook_resid_mid, ln2.hook_normalized, hook_mlp_out, hook_resid_post.
  """
  cfg: ModelConfig
  _: dataclasses.KW_ONLY
  deterministic: bool

  @nn.compact
  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array,
               cache: attention.Prefill | attention.Decode | None = None,
               segment_ids_BT: jax.Array | None = None):
    cfg = self.cfg
    norm = lambda name: layers.make_norm(cfg, name)
    hook = lambda name, x: hooks.point(self, name, x)
    residual_dropout = nn.Dropout(cfg.dropout)
    # Bottleneck adapters (config.peft houlsby / pfeiffer) on a sublayer's output, before its add.
    adapted = lambda sublayer, h_BTD: (bottleneck.Adapter(cfg, name=f'{sublayer}_adapter')(h_BTD)
                                       if cfg.peft.adapts_block(sublayer) else h_BTD)
    x_BTD = hook('hook_resid_pre', x_BTD)
    h_BTD = attention.Attention(cfg, name='attn')(
        hook('ln1.hook_normalized', norm('attn_norm')(x_BTD)), positions_BT, self.deterministic,
        cache, segment_ids_BT)
    x_BTD = x_BTD + residual_dropout(hook('hook_attn_out', adapted('attn', h_BTD)),
                                     deterministic=self.deterministic)
    x_BTD = hook('hook_resid_mid', x_BTD)
    h_BTD = Mlp(cfg, name='mlp')(hook('ln2.hook_normalized', norm('mlp_norm')(x_BTD)),
                                 self.deterministic)
    x_BTD = x_BTD + residual_dropout(hook('hook_mlp_out', adapted('mlp', h_BTD)),
                                     deterministic=self.deterministic)
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'act_embed'))
    # (carry, output) so the block also works under nn.scan.
    return hook('hook_resid_post', x_BTD), None


class Transformer(nn.Module):
  """tokens [B, T] int -> logits [B, T, V] float32 ([B, num_labels] with the classify head).

  Packed rows (several examples each) pass `segment_ids_BT` (1, 2, ... per example, 0 padding)
  and positions that restart per example: attention then never crosses examples.
  With `cache` (applied with mutable=['cache']), the `cache` collection is the KV cache
  (attention.py): `attention.Prefill` fills it from right-padded prompts and returns only each
  prompt's last logits, [B, 1, V]; `attention.Decode` runs tokens [B, 1] at positions_BT through it.

  Hook points (model/hooks.py; lepton_jax.interpret reads them): hook_embed, hook_pos_embed
  (learned positions), those of each block, ln_final.hook_normalized (the final norm's output),
  unembed.hook_out (the logits).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
               deterministic: bool = True,
               cache: attention.Prefill | attention.Decode | None = None,
               segment_ids_BT: jax.Array | None = None) -> jax.Array:
    cfg = self.cfg
    if cache is not None and segment_ids_BT is not None:
      raise ValueError('segment ids are for training on packed rows, not for a KV cache')
    if cfg.head == 'classify' and segment_ids_BT is None and cache is None:
      # Padding is its own segment and real tokens count positions from the first of them, so
      # left- and right-padded rows compute the same (right padding as transformers does).
      real_BT = tokens_BT != cfg.pad_id
      segment_ids_BT = real_BT.astype(jnp.int32)
      if positions_BT is None:
        positions_BT = jnp.maximum(jnp.cumsum(real_BT, axis=1) - 1, 0)
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    hook = lambda name, x: hooks.point(self, name, x)
    embed = embedding(cfg)
    x_BTD = hook('hook_embed', embed(tokens_BT))
    virtual = cfg.peft.virtual_tokens
    if virtual:  # Prompt tuning (model/prompt.py): N virtual tokens at positions 0..N-1.
      if segment_ids_BT is not None:
        raise ValueError("config.peft.method='prompt' prepends virtual tokens to each row, which "
                         'packed examples (segment ids) would not see: set config.data.packing='
                         'False')
      batch = tokens_BT.shape[0]
      positions_BT = positions_BT + virtual
      if not isinstance(cache, attention.Decode):  # Decoding finds them in the cache.
        prompt_ND = prompt.embedding(self, embed).astype(cfg.dtype)
        x_BTD = jnp.concatenate([jnp.broadcast_to(prompt_ND, (batch, *prompt_ND.shape)), x_BTD],
                                axis=1)
        positions_BT = jnp.concatenate(
            [jnp.broadcast_to(jnp.arange(virtual), (batch, virtual)), positions_BT], axis=1)
      if isinstance(cache, attention.Prefill):
        cache = cache.replace(lengths_B=cache.lengths_B + virtual)
    if cfg.positions == 'learned':
      pos_table = self.param(
          'pos_embedding', nn.with_logical_partitioning(layers.default_kernel_init,
                                                        (None, 'embed')),
          (cfg.max_seq_len, cfg.d_model), cfg.param_dtype)
      x_BTD = x_BTD + hook('hook_pos_embed',
                           jnp.take(pos_table, positions_BT, axis=0).astype(cfg.dtype))
    x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'act_embed'))

    block = Block
    if cfg.remat != 'none':
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      # {True: 0} stacks every collection on the layer axis, not only params: a collection
      # missing here (cache, intermediates, ...) would be silently dropped inside the scan.
      stack = nn.scan(block, variable_axes={True: 0}, split_rngs={'params': True, 'dropout': True},
                      in_axes=nn.broadcast, length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BTD, _ = stack(cfg, deterministic=deterministic, name='layers')(x_BTD, positions_BT,
                                                                          cache, segment_ids_BT)
    else:
      for i in range(cfg.num_layers):
        x_BTD, _ = block(cfg, deterministic=deterministic, name=f'layers_{i}')(
            x_BTD, positions_BT, cache, segment_ids_BT)

    if isinstance(cache, attention.Prefill):  # The head only where the next token is drawn.
      last_B11 = (cache.lengths_B - 1)[:, None, None]
      x_BTD = jnp.take_along_axis(x_BTD, last_B11, axis=1)
    elif virtual and cache is None:  # Logits for the row's own tokens only.
      x_BTD = x_BTD[:, virtual:]
    x_BTD = hook('ln_final.hook_normalized', layers.make_norm(cfg, 'final_norm')(x_BTD))
    if cfg.head == 'classify':
      return self._score(pooled(x_BTD, tokens_BT, cfg.pad_id, cfg.pool), deterministic)
    logits_BTV = hook('unembed.hook_out', head(cfg, embed, x_BTD, deterministic))
    return logits_BTV.astype(jnp.float32)

  def _score(self, x_BD: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.cfg
    return layers.Dense((cfg.num_labels,), in_axes=('embed',), out_axes=(None,),
                        dtype=cfg.dtype, param_dtype=cfg.param_dtype, lora=cfg.lora,
                        quant=cfg.quant, deterministic=deterministic,
                        name='score')(x_BD).astype(jnp.float32)


def embedding(cfg: ModelConfig) -> layers.Embed:
  """The token embedding table, 'embed' (tied, also the output head)."""
  return layers.Embed(cfg.vocab_size, d_model=cfg.d_model, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, quant=cfg.quant, name='embed')


def head(cfg: ModelConfig, embed: layers.Embed, x_BTD: jax.Array,
         deterministic: bool = True) -> jax.Array:
  """The output head, the final norm's output -> logits: `embed` tied, else the Dense 'head'.
  A function of its own (called in a compact method) so that interpret's logit lens reads
  residuals through the same layers."""
  if cfg.tie_embeddings:
    return embed.attend(x_BTD)
  return layers.Dense((cfg.vocab_size,), in_axes=('embed',), out_axes=('vocab',), dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, lora=cfg.lora, quant=cfg.quant,
                      prune=cfg.prune, deterministic=deterministic, name='head')(x_BTD)


def pooled(x_BTD: jax.Array, tokens_BT: jax.Array, pad_id: int, pool: str) -> jax.Array:
  """One hidden state per row (ModelConfig.pool). `last` takes the rightmost position whose id is
  not pad_id, as transformers does, so right-padded rows give their last real token's state (and
  a row of padding its first position's)."""
  real_BT = tokens_BT != pad_id
  if pool == 'mean':
    weights_BT = real_BT.astype(jnp.float32) / jnp.maximum(real_BT.sum(-1, keepdims=True), 1)
    return jnp.einsum('btd,bt->bd', x_BTD.astype(jnp.float32), weights_BT).astype(x_BTD.dtype)
  last_B = jnp.argmax(jnp.arange(tokens_BT.shape[1]) * real_BT, axis=-1)
  return jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)[:, 0]
