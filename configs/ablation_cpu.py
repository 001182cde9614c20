"""The base of the published-ablation sweeps (configs/sweeps/) at CPU scale.

stdlib_tiny's model (4 layers, d 192, GQA 6/2, SwiGLU, RMSNorm, RoPE; SentencePiece BPE 1024 on
the standard library) for 250 steps of 16 x 128 tokens (512k tokens), evaluated every 50 steps
on 8 batches of held-out stdlib files; bits per byte is what the sweeps compare. No sample at the
end. On a 2-core AVX2 CPU, with two sweep shards side by side (one core and one device each), a
run takes ~3 minutes and the 51 runs of the five published sweeps took 80 minutes
(docs/ablations.md); a TPU slice takes a bigger model and more steps from the command line.

  python scripts/ablate.py --sweep=configs/sweeps/gated_mlp.py --workdir=/tmp/ablations/gated_mlp

The argument `val_full` adds an evaluator over the whole validation split (169 stdlib files, not
the default window's first 16k tokens) at the last step: eval/val_full/bits_per_byte.
"""
import ml_collections

from lepton_jax import config_lib


ARGS = ('', 'val_full')


def get_config(arg=None):
  if (arg or '') not in ARGS:
    raise ValueError(f'configs/ablation_cpu.py: argument {arg!r}; it takes one of {ARGS}')
  config = config_lib.base_config()
  config.total_steps = 250
  config.batch_size = 16
  config.seq_len = 128
  config.log_every_steps = 20
  config.eval_every_steps = 50
  config.eval_batches = 8
  config.checkpoint_every_steps = 250
  config.keep_checkpoints = 1

  config.data.source = 'stdlib'
  config.data.tokenizer = 'sentencepiece'
  config.data.vocab_size = 1024

  config.model.update(num_layers=4, d_model=192, num_heads=6, num_kv_heads=2, head_dim=32,
                      d_ff=512, max_seq_len=128)
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 25
  config.sample.num_tokens = 0
  if arg == 'val_full':
    # More batches than the split holds: the evaluator takes all it has (data.make_eval_batches).
    config.evals.val_full = ml_collections.ConfigDict(
        dict(type='lm', every=config.total_steps, batches=10**6))
  return config
