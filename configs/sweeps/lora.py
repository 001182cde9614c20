"""LoRA against full fine-tuning when adapting to an unseen package family (docs/lora.md).

Ranks 1 to 64 on q,v and on all linear layers, rsLoRA and DoRA at one rank, and full
fine-tuning, all from the same base run (the argument: its workdir). Published shapes to compare
with: LoRA (Hu et al. 2021) Table 6, quality flat beyond r ~ 4-8, and adapting more weight types
beats a higher rank at an equal budget; QLoRA (Dettmers et al. 2023), adapters on all linear
layers match full fine-tuning where q,v alone do not.

  python scripts/ablate.py --sweep=configs/sweeps/lora.py:/tmp/lora_base --workdir=/tmp/lora_study \
      --metric=eval/loss
  # Some methods only, at 3 seeds (the argument: BASE_DIR[:METHOD,METHOD,...]):
  python scripts/ablate.py --sweep=configs/sweeps/lora.py:/tmp/lora_base:full,all_r8,all_r8_dora \
      --seeds=3 --workdir=/tmp/lora_seeds --metric=eval/loss
"""
RANKS = (1, 2, 4, 8, 16, 64)
LORA_LR = 3e-3  # Adapters train at ~3x full fine-tuning's rate here (one rate for every rank).
# One alpha for every rank, as Hu et al.: the scale alpha / r shrinks as r grows, which rsLoRA's
# alpha / sqrt(r) corrects (Kalajdzievski 2023).
ALPHA = 8.0


def adapter(targets, rank, **fields):
  return {'lora.targets': targets, 'lora.rank': rank, 'lora.alpha': ALPHA,
          'optimizer.learning_rate': LORA_LR, **{f'lora.{k}': v for k, v in fields.items()}}


def get_sweep(arg=None):
  if not arg:
    raise ValueError('configs/sweeps/lora.py needs the base run: --sweep=configs/sweeps/lora.py:DIR')
  base, _, only = arg.partition(':')
  methods = {'full': {}}
  for rank in RANKS:
    methods[f'qv_r{rank}'] = adapter(('q', 'v'), rank)
  for rank in RANKS:
    methods[f'all_r{rank}'] = adapter(('all-linear',), rank)
  methods['all_r64_rslora'] = adapter(('all-linear',), 64, rslora=True)
  methods['all_r8_dora'] = adapter(('all-linear',), 8, dora=True)
  if only:
    unknown = set(only.split(',')) - set(methods)
    if unknown:
      raise ValueError(f'configs/sweeps/lora.py: no method {sorted(unknown)}; the methods are '
                       f'{list(methods)}')
    methods = {name: methods[name] for name in only.split(',')}
  return dict(config=f'configs/lora_adapt.py:{base}', seeds=1, axes={'method': methods})
