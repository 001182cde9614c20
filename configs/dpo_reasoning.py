"""DPO of an SFT run on reasoning-gym preference pairs (scripts/reasoning_pairs.py).

  python scripts/reasoning_pairs.py --config=configs/sft_reasoning.py:/tmp/stdlib_tiny,/tmp/reasoning \
      --workdir=/tmp/sft_full --data_dir=/tmp/reasoning
  python -m lepton_jax.train --config=configs/dpo_reasoning.py:/tmp/sft_full,/tmp/reasoning \
      --workdir=/tmp/dpo [--config.seed=1]
  python scripts/reasoning_accuracy.py --config=configs/dpo_reasoning.py:/tmp/sft_full,/tmp/reasoning \
      --workdir=/tmp/dpo --data_dir=/tmp/reasoning

The argument is the SFT run's workdir and the task directory. Training reads pairs.jsonl with
val_fraction=0.5, which reasoning_pairs.py wrote so that the eval split is the held-out
questions' pairs: eval/rewards/accuracies is the held-out reward accuracy. The reference is the
SFT model, its log-probs precomputed once (dpo.precompute_ref_log_probs: no frozen copy).
"""
import pathlib

from lepton_jax import config_lib


def get_config(arg=None):
  run, _, data_dir = (arg or '').partition(',')
  if not (run and data_dir):
    raise ValueError('configs/dpo_reasoning.py needs the SFT run and the task directory: '
                     '--config=configs/dpo_reasoning.py:/path/to/workdir[:STEP],/path/to/data')
  config = config_lib.base_config()
  config.init_from = f'workdir:{run}'
  config.objective = 'dpo'
  config.dpo.update(loss='sigmoid', beta=0.1, precompute_ref_log_probs=True)
  config.total_steps = 60
  config.batch_size = 16  # Pairs.
  config.seq_len = 64  # A question and its answer: under 64 ids.
  config.log_every_steps = 10
  config.eval_every_steps = 60
  config.eval_batches = 100  # All of the held-out pairs.
  config.checkpoint_every_steps = 60
  config.keep_checkpoints = 1
  config.data.update(source='jsonl', format='preference',
                     path=str(pathlib.Path(data_dir) / 'pairs.jsonl'), val_fraction=0.5,
                     truncate='left')
  config.optimizer.update(learning_rate=1e-4, schedule='cosine', warmup_steps=6,
                          weight_decay=0.0)
  config.sample.num_tokens = 0
  return config
