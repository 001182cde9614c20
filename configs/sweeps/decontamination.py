"""Is the default eval loss optimistic? Training on the raw train split against the decontaminated
one (data.filters `decontaminate`: train files holding half of some validation file's 13-grams
dropped; 91 of 1,617 on the stdlib, docs/data.md), scored on the default eval window and on the
whole validation split, where the copied codecs and stubs are read.

GPT-3 (Brown et al. 2020, appendix C) found contamination from near 0 to over 90% of a benchmark
with the same 13-gram test, and little effect on most scores.

  python scripts/ablate.py --sweep=configs/sweeps/decontamination.py \
      --workdir=/tmp/ablations/decontamination --metric=eval/val_full/bits_per_byte
"""


def get_sweep(arg=None):
  del arg
  return dict(config='configs/ablation_cpu.py:val_full', seeds=3, axes={'train': {
      'raw': {'data.filters.steps': ()},
      'decontaminated': {'data.filters.steps': ('decontaminate',)},
  }})
