"""Schedules at equal tokens: cosine decay against WSD (warmup, constant, linear cooldown).

Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations":
a constant learning rate with a cooldown over the last ~20% of steps matches or beats cosine.
Both decay to the config's min_lr_ratio.
"""


def get_sweep(arg=None):
  del arg
  return dict(config='configs/ablation_cpu.py', seeds=3, axes={'schedule': {
      'cosine': {'optimizer.schedule': 'cosine'},
      'wsd': lambda config: {'optimizer.schedule': 'wsd',
                             'optimizer.cooldown_steps': config.total_steps // 5},
  }})
