"""Norms: LayerNorm (the vanilla Transformer's) against RMSNorm, in quality and step time.

Narang et al. 2021, "Do Transformer Modifications Transfer Across Implementations and
Applications?", Table 1: vanilla 1.838 loss at 3.50 steps/s, RMSNorm 1.821 at 3.68 steps/s (the
table's tokens/s column is the step time here).
"""


def get_sweep(arg=None):
  del arg
  return dict(config='configs/ablation_cpu.py', seeds=3,
              axes={'norm': {name: {'model.norm': name} for name in ('layernorm', 'rmsnorm')}})
