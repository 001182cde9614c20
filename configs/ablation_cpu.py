"""The base of the published-ablation sweeps (configs/sweeps/) at CPU scale.

stdlib_tiny's model (4 layers, d 192, GQA 6/2, SwiGLU, RMSNorm, RoPE; SentencePiece BPE 1024 on
the standard library) for 1000 steps of 16 x 128 tokens (2M tokens), evaluated every 250 steps
on 8 batches of held-out stdlib files; bits per byte is what the sweeps compare. No sample at the
end. About 3.5 minutes a run at the ~10k tokens/s of a 2-core CPU: the 57 runs of the five sweeps
take about 3.3 hours (an estimate from short runs, docs/evaluation.md).

  python scripts/ablate.py --sweep=configs/sweeps/gated_mlp.py --workdir=/tmp/ablations/gated_mlp
"""
from lepton_jax import config_lib


def get_config(arg=None):
  del arg
  config = config_lib.base_config()
  config.total_steps = 1000
  config.batch_size = 16
  config.seq_len = 128
  config.log_every_steps = 20
  config.eval_every_steps = 250
  config.eval_batches = 8
  config.checkpoint_every_steps = 250
  config.keep_checkpoints = 1

  config.data.source = 'stdlib'
  config.data.tokenizer = 'sentencepiece'
  config.data.vocab_size = 1024

  config.model.update(num_layers=4, d_model=192, num_heads=6, num_kv_heads=2, head_dim=32,
                      d_ff=512, max_seq_len=128)
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 100
  config.sample.num_tokens = 0
  return config
