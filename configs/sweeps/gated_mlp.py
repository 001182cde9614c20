"""Gated MLPs at equal parameter count: ReLU and GELU against GEGLU and SwiGLU.

Shazeer 2020, "GLU Variants Improve Transformer", Table 1 (T5-base on C4, log-perplexity after
65,536 steps): ReLU 1.997, GELU 1.983, GEGLU 1.942, SwiGLU 1.944. A gated MLP has three matrices
to an ungated one's two, so its d_ff is 2/3 of the ungated width (the paper: 2048 vs 3072): the
config's d_ff is taken as the gated width when its mlp is gated, as the ungated one otherwise.
"""
GATED = ('swiglu', 'geglu')


def widths(config) -> tuple[int, int]:
  """(gated d_ff, ungated d_ff) with equal MLP parameters."""
  d_ff = config.model.d_ff
  gated = d_ff if config.model.mlp in GATED else 2 * (d_ff // 3)
  return gated, gated * 3 // 2


def mlp(name: str):
  return lambda config: {'model.mlp': name,
                         'model.d_ff': widths(config)[0 if name in GATED else 1]}


def get_sweep(arg=None):
  del arg
  return dict(config='configs/ablation_cpu.py', seeds=3,
              axes={'mlp': {name: mlp(name) for name in ('relu', 'gelu', 'geglu', 'swiglu')}})
