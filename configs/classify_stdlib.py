"""Which top-level stdlib package a function is from: a classify head on a trained lepton run.

  python scripts/stdlib_functions.py --out_dir=/tmp/stdlib_functions
  python -m lepton_jax.train --config=configs/classify_stdlib.py:/tmp/stdlib_tiny,/tmp/stdlib_functions \
      --workdir=/tmp/cls_full [--config.trainable="('score/.*',)" | --config.lora.targets="('q','v')"]

The argument is the trained run's workdir (`DIR:STEP` for another checkpoint than the latest)
and the directory scripts/stdlib_functions.py wrote: training reads its train.jsonl (5% of those
records, by a hash of the line, are the eval split logged during training) and its labels.json.
The test split is other files, so it is evaluated apart, on the trained run:

  lepton-eval --config=configs/classify_stdlib.py:/tmp/stdlib_tiny,/tmp/stdlib_functions \
      --workdir=/tmp/cls_full --config.data.path=/tmp/stdlib_functions/test.jsonl \
      --config.data.val_fraction=1.0 [the same trainable / lora overrides]

The whole model trains by default; the head alone with trainable=('score/.*',); LoRA adapters
on q and v with the head with lora.targets (docs/finetune.md has the measured table).
"""
import json
import pathlib

from lepton_jax import config_lib


def get_config(arg=None):
  run, _, data_dir = (arg or '').partition(',')
  if not (run and data_dir):
    raise ValueError('configs/classify_stdlib.py needs the trained run and the task directory: '
                     '--config=configs/classify_stdlib.py:/path/to/workdir[:STEP],/path/to/data')
  labels = json.loads((pathlib.Path(data_dir) / 'labels.json').read_text())
  config = config_lib.base_config()
  config.init_from = f'workdir:{run}'
  config.objective = 'classify'
  config.model.head = 'classify'
  config.total_steps = 200
  config.batch_size = 16
  config.seq_len = 128  # The default run's window; a longer function keeps its start.
  config.log_every_steps = 20
  config.eval_every_steps = 200
  config.eval_batches = 100  # All of the eval split (and of test.jsonl under lepton-eval).
  config.checkpoint_every_steps = 200
  config.data.update(source='jsonl', format='classification',
                     path=str(pathlib.Path(data_dir) / 'train.jsonl'), labels=tuple(labels),
                     val_fraction=0.05, truncate='right')
  config.lora.update(rank=8, alpha=16.0)  # Used when lora.targets names modules.
  config.optimizer.update(learning_rate=3e-4, schedule='cosine', warmup_steps=20,
                          weight_decay=0.0)
  config.sample.num_tokens = 0
  return config
