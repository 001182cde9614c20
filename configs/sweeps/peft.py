"""The PEFT family side by side when adapting to an unseen package family (configs/lora_adapt.py).

Full fine-tuning, LoRA r=8 on q,v, AdaLoRA (initial rank 12 pruned to 8 on q,v), Houlsby and
Pfeiffer adapters sized to LoRA's budget, and prompt tuning with 20 and 100 virtual tokens, from
the same base run (the argument: its workdir), at 3 seeds. Published shapes to compare with:
AdaLoRA beats LoRA at an equal budget (Zhang et al. 2023, Table 1); Houlsby adapters come within
0.4% of full fine-tuning with 3.6% of the parameters (Houlsby et al. 2019); prompt tuning trails
fine-tuning on small models (Lester et al. 2021, Fig. 1).

  python scripts/ablate.py --sweep=configs/sweeps/peft.py:/tmp/lora_base --workdir=/tmp/peft_study \
      --metric=eval/loss

On stdlib_tiny's shape (d 192, 4 layers, q 192 and v 64 outputs) LoRA q,v r=8 trains 20,480
params; a Houlsby adapter of width b trains 385 b + 192 per sublayer, so b=6 (8 adapters: 20,016)
and Pfeiffer b=12 (4 adapters: 19,248) match it; 100 virtual tokens are 19,200. The base has 128
positions, so prompt tuning's rows hold 128 - N real tokens (fewer tokens per step).
"""
ADAPTER_LR = 3e-3  # docs/lora.md's adapter rate; full fine-tuning keeps lora_adapt.py's 1e-3.
NO_LORA = {'lora.targets': ()}


def get_sweep(arg=None):
  if not arg:
    raise ValueError('configs/sweeps/peft.py needs the base run: '
                     '--sweep=configs/sweeps/peft.py:DIR')
  lr = {'optimizer.learning_rate': ADAPTER_LR}
  methods = {
      'full': {},
      'lora_qv_r8': {**lr, 'lora.targets': ('q', 'v'), 'lora.rank': 8, 'lora.alpha': 8.0},
      'adalora_qv_r12_8': {**lr, 'peft.method': 'adalora', 'lora.targets': ('q', 'v'),
                           'lora.rank': 12, 'lora.alpha': 8.0, 'peft.target_rank': 8,
                           'peft.tinit': 20, 'peft.tfinal': 60, 'peft.delta_t': 5},
      'houlsby_b6': {**lr, **NO_LORA, 'peft.method': 'houlsby', 'peft.bottleneck': 6},
      'pfeiffer_b12': {**lr, **NO_LORA, 'peft.method': 'pfeiffer', 'peft.bottleneck': 12},
  }
  for virtual in (20, 100):
    methods[f'prompt_{virtual}'] = {**NO_LORA, 'optimizer.learning_rate': 3e-2,
                                    'peft.method': 'prompt', 'peft.num_virtual_tokens': virtual,
                                    'seq_len': 128 - virtual}
  return dict(config=f'configs/lora_adapt.py:{arg}', seeds=3, axes={'method': methods})
