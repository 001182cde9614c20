"""Positions: RoPE against learned absolute positions and none at all.

EleutherAI, "Rotary Embeddings: A Relative Revolution" (2021): a 125M model on OpenWebText2,
validation loss learned 2.809 vs RoPE 2.759 (~0.05 nats in RoPE's favour).
"""


def get_sweep(arg=None):
  del arg
  return dict(config='configs/ablation_cpu.py', seeds=3,
              axes={'positions': {name: {'model.positions': name}
                                  for name in ('rope', 'learned', 'none')}})
