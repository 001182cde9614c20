"""nanoGPT's model and training step in PyTorch: the reference for the benchmark target.

docs/benchmarks.md measures lepton_jax against Karpathy's nanoGPT on the same shapes. nanoGPT
cannot be fetched here, so this file re-implements what its model.py and train.py do per step:

- GPT-2 architecture: learned token and position embeddings, pre-LayerNorm blocks (LayerNorm with
  an optional bias; nanoGPT's train.py defaults to bias=False), one fused c_attn projection for
  q, k and v, causal attention through F.scaled_dot_product_attention(is_causal=True), a 4x GELU
  MLP, a final LayerNorm and an LM head tied to the token embedding.
- nanoGPT's init: N(0, 0.02) weights, c_proj weights scaled by 1/sqrt(2 * n_layer), zero biases.
- Its training step: forward with cross-entropy loss, backward, global-norm gradient clipping at
  1.0, AdamW (lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on matrices only; fused only on CUDA),
  zero_grad(set_to_none=True). The learning-rate schedule is left out: it costs nothing per step.

The default shape is the CPU recipe of nanoGPT's shakespeare_char README (4 layers, 4 heads,
d 128, context 64, batch 12, dropout 0, vocab 65, float32, no torch.compile). Batches are random
tokens: data loading is not what this times. Prints one line of JSON with median step figures.

  pip install torch==2.13.0
  python scripts/bench_nanogpt_torch.py
  python scripts/bench_nanogpt_torch.py --n_layer 6 --n_head 6 --n_embd 384 --block_size 256 \
      --batch_size 16 --steps 20 --warmup 3
  python scripts/bench_nanogpt_torch.py --part=fwd_bwd  # no clipping, no optimizer
"""
import argparse
import dataclasses
import json
import math
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  vocab_size: int = 65
  block_size: int = 64
  n_layer: int = 4
  n_head: int = 4
  n_embd: int = 128
  bias: bool = False


class LayerNorm(nn.Module):
  """LayerNorm whose bias can be switched off (nn.LayerNorm's could not when nanoGPT was written)."""

  def __init__(self, ndim: int, bias: bool):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(ndim))
    self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

  def forward(self, x_BTD):
    return F.layer_norm(x_BTD, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

  def __init__(self, config: GPTConfig):
    super().__init__()
    self.n_head = config.n_head
    self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
    self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

  def forward(self, x_BTD):
    batch, length, width = x_BTD.shape
    q_BTD, k_BTD, v_BTD = self.c_attn(x_BTD).split(width, dim=2)
    # (B, T, D) -> (B, H, T, D/H): heads become a batch dimension for the attention kernel.
    q_BHTK, k_BHTK, v_BHTK = (
        t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2)
        for t in (q_BTD, k_BTD, v_BTD))
    y_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, is_causal=True)
    y_BTD = y_BHTK.transpose(1, 2).contiguous().view(batch, length, width)
    return self.c_proj(y_BTD)


class MLP(nn.Module):

  def __init__(self, config: GPTConfig):
    super().__init__()
    self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
    self.gelu = nn.GELU()
    self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

  def forward(self, x_BTD):
    return self.c_proj(self.gelu(self.c_fc(x_BTD)))


class Block(nn.Module):

  def __init__(self, config: GPTConfig):
    super().__init__()
    self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
    self.attn = CausalSelfAttention(config)
    self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
    self.mlp = MLP(config)

  def forward(self, x_BTD):
    x_BTD = x_BTD + self.attn(self.ln_1(x_BTD))
    return x_BTD + self.mlp(self.ln_2(x_BTD))


class GPT(nn.Module):

  def __init__(self, config: GPTConfig):
    super().__init__()
    self.transformer = nn.ModuleDict(dict(
        wte=nn.Embedding(config.vocab_size, config.n_embd),
        wpe=nn.Embedding(config.block_size, config.n_embd),
        h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
        ln_f=LayerNorm(config.n_embd, bias=config.bias),
    ))
    self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
    self.transformer.wte.weight = self.lm_head.weight  # Tied input and output embeddings.
    self.apply(init_weights)
    # GPT-2: scale the residual-stream projections so the residual variance stays O(1) with depth.
    for name, param in self.named_parameters():
      if name.endswith('c_proj.weight'):
        nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

  def forward(self, tokens_BT, targets_BT):
    positions_T = torch.arange(tokens_BT.shape[1], device=tokens_BT.device)
    x_BTD = self.transformer.wte(tokens_BT) + self.transformer.wpe(positions_T)
    for block in self.transformer.h:
      x_BTD = block(x_BTD)
    logits_BTV = self.lm_head(self.transformer.ln_f(x_BTD))
    return F.cross_entropy(logits_BTV.view(-1, logits_BTV.size(-1)), targets_BT.view(-1))


def init_weights(module: nn.Module):
  if isinstance(module, (nn.Linear, nn.Embedding)):
    nn.init.normal_(module.weight, mean=0.0, std=0.02)
  if isinstance(module, nn.Linear) and module.bias is not None:
    nn.init.zeros_(module.bias)


def make_optimizer(model: nn.Module) -> torch.optim.AdamW:
  """AdamW decaying only matrices (weights, embeddings), as nanoGPT's configure_optimizers."""
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [
      dict(params=[p for p in params if p.dim() >= 2], weight_decay=0.1),
      dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0),
  ]
  return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), fused=False)


def train_step(model, optimizer, tokens_BT, targets_BT):
  loss = model(tokens_BT, targets_BT)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
  optimizer.step()
  optimizer.zero_grad(set_to_none=True)
  return loss


def forward_backward(model, optimizer, tokens_BT, targets_BT):
  """The loss and its gradients only: train_step without clipping and the optimizer."""
  del optimizer
  loss = model(tokens_BT, targets_BT)
  loss.backward()
  model.zero_grad(set_to_none=True)
  return loss


def forward(model, optimizer, tokens_BT, targets_BT):
  del optimizer
  with torch.no_grad():
    return model(tokens_BT, targets_BT)


PARTS = {'step': train_step, 'fwd_bwd': forward_backward, 'fwd': forward}


def random_batches(config: GPTConfig, batch_size: int, count: int):
  """(input, target) pairs of random tokens, made before timing starts."""
  shape = (batch_size, config.block_size + 1)
  sequences = [torch.randint(config.vocab_size, shape) for _ in range(count)]
  return [(s[:, :-1].contiguous(), s[:, 1:].contiguous()) for s in sequences]


def time_steps(model, optimizer, batches, warmup: int, steps: int,
               step_fn=train_step) -> list[float]:
  """Seconds of each timed step, after `warmup` untimed ones (allocator, torch.compile)."""
  for i in range(warmup):
    step_fn(model, optimizer, *batches[i % len(batches)])
  seconds = []
  for i in range(steps):
    start = time.perf_counter()
    loss = step_fn(model, optimizer, *batches[i % len(batches)])
    loss.item()  # The step is done once its loss can be read.
    seconds.append(time.perf_counter() - start)
  return seconds


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--n_layer', type=int, default=4)
  parser.add_argument('--n_head', type=int, default=4)
  parser.add_argument('--n_embd', type=int, default=128)
  parser.add_argument('--block_size', type=int, default=64)
  parser.add_argument('--batch_size', type=int, default=12)
  parser.add_argument('--vocab_size', type=int, default=65)
  parser.add_argument('--bias', action='store_true', help='Biases in Linear and LayerNorm.')
  parser.add_argument('--steps', type=int, default=50, help='Timed steps.')
  parser.add_argument('--warmup', type=int, default=10, help='Untimed steps first.')
  parser.add_argument('--compile', action='store_true', help='torch.compile the model.')
  parser.add_argument('--part', choices=sorted(PARTS), default='step',
                      help='Time the whole step, or only the forward and backward, '
                      'or only the forward.')
  return parser.parse_args()


def main():
  args = parse_args()
  torch.manual_seed(1337)
  config = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size,
                     n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, bias=args.bias)
  model = GPT(config)
  optimizer = make_optimizer(model)
  if args.compile:
    model = torch.compile(model)
  batches = random_batches(config, args.batch_size, count=8)
  ms_per_step = 1000 * statistics.median(time_steps(model, optimizer, batches, args.warmup,
                                                    args.steps, PARTS[args.part]))
  tokens_per_step = args.batch_size * args.block_size
  print(json.dumps(dict(
      impl='nanogpt_torch',
      part=args.part,
      tokens_per_sec=round(tokens_per_step / (ms_per_step / 1000), 1),
      ms_per_step=round(ms_per_step, 3),
      steps=args.steps,
      warmup=args.warmup,
      n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
      block_size=args.block_size, batch_size=args.batch_size, vocab_size=args.vocab_size,
      bias=args.bias, dtype='float32', compile=args.compile,
      torch_version=torch.__version__,
      torch_threads=torch.get_num_threads(),
  )))


if __name__ == '__main__':
  main()
