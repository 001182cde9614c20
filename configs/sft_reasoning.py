"""SFT of a trained lepton run on reasoning-gym questions (scripts/reasoning_tasks.py).

  python scripts/reasoning_tasks.py --questions_dir=/tmp/reasoning
  python -m lepton_jax.train --config=configs/sft_reasoning.py:/tmp/stdlib_tiny,/tmp/reasoning \
      --workdir=/tmp/sft_full [--config.lora.targets="('q','k','v','o','up','down','gate')"]
  python scripts/reasoning_tasks.py --data_dir=/tmp/reasoning --workdir=/tmp/sft_full

The argument is the trained run's workdir (`DIR:STEP` for another checkpoint than the latest)
and the directory the script wrote: training reads its train.jsonl (prompt_completion records,
the loss on the answer and its eos; 2% of them, by a hash of the line, are the eval split
logged during training), packed whole into rows. train_chat.jsonl holds the same as chats
(--config.data.format=chat --config.data.path=.../train_chat.jsonl). The whole model trains by
default, LoRA adapters with lora.targets (docs/finetune.md has the measured table).
"""
import pathlib

from lepton_jax import config_lib


def get_config(arg=None):
  run, _, data_dir = (arg or '').partition(',')
  if not (run and data_dir):
    raise ValueError('configs/sft_reasoning.py needs the trained run and the task directory: '
                     '--config=configs/sft_reasoning.py:/path/to/workdir[:STEP],/path/to/data')
  config = config_lib.base_config()
  config.init_from = f'workdir:{run}'
  config.objective = 'sft'
  config.total_steps = 300  # About 2 epochs of the 7342 records' 2165 rows.
  config.batch_size = 16
  config.seq_len = 128  # The default run's window: four or five questions per row.
  config.log_every_steps = 10
  config.eval_every_steps = 300
  config.eval_batches = 8
  config.checkpoint_every_steps = 300
  config.keep_checkpoints = 1
  config.data.update(source='jsonl', format='prompt_completion',
                     path=str(pathlib.Path(data_dir) / 'train.jsonl'), val_fraction=0.02,
                     packing=True, truncate='right')
  config.lora.update(rank=16, alpha=32.0)  # Used when lora.targets names modules.
  config.optimizer.update(learning_rate=3e-3, schedule='cosine', warmup_steps=15,
                          weight_decay=0.0)
  config.sample.num_tokens = 0
  return config
