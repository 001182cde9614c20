"""Learning-rate sensitivity with and without qk-norm and z-loss.

Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training instabilities":
qk-layernorm (against attention-logit growth) and z-loss (against output-logit divergence)
flatten the final-loss-vs-learning-rate curve at high learning rates. Runs that diverge stop at
their first non-finite step (config.nonfinite='stop') and show up as failed cells.
"""
LEARNING_RATES = ('3e-3', '1e-2', '3e-2')  # The base rate and two above it, where they differ.


def get_sweep(arg=None):
  del arg
  return dict(config='configs/ablation_cpu.py', seeds=3, axes={
      'lr': {lr: {'optimizer.learning_rate': float(lr)} for lr in LEARNING_RATES},
      'stabilizers': {'none': {'model.qk_norm': False, 'z_loss': 0.0},
                      'qk_norm+z_loss': {'model.qk_norm': True, 'z_loss': 1e-4}},
  })
