"""A classification head on a Hugging Face causal LM (or a *ForSequenceClassification directory),
fine-tuned on labelled JSONL records.

  python -m lepton_jax.train --config=configs/classify_hf.py:/path/to/hf_dir --workdir=/tmp/cls \
      --config.data.path=reviews.jsonl [--config.data.labels="('neg','neutral','pos')"]
      [--config.lora.targets="('q','v')" | --config.trainable="('score/.*',)"]

Each line is {"text": ..., "label": one of data.labels}. The head is a `score` Dense
[d_model, num_labels] without bias on the last non-padding token's final hidden state, as
transformers' classifiers; the whole model trains by default, through LoRA adapters (with the
head) with lora.targets, or the head alone with trainable=('score/.*',). Evaluation logs
eval/loss, eval/accuracy and eval/macro_f1; scripts/export_hf.py writes the run back as the
family's *ForSequenceClassification.
"""
from lepton_jax import config_lib


def get_config(arg=None):
  if not arg:
    raise ValueError('configs/classify_hf.py needs the Hugging Face directory: '
                     '--config=configs/classify_hf.py:/path/to/hf_dir')
  config = config_lib.base_config()
  config.init_from = f'hf:{arg}'
  config.objective = 'classify'
  config.model.head = 'classify'
  config.total_steps = 500
  config.batch_size = 16
  config.seq_len = 256
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 250
  config.keep_checkpoints = 2
  # Binary labels 0 / 1 (SST-2's, IMDB's) unless data.labels names others.
  config.data.update(source='jsonl', format='classification', path='', labels=(0, 1),
                     val_fraction=0.1, truncate='left')  # A long text keeps its end.
  config.optimizer.update(learning_rate=2e-5, schedule='linear', warmup_steps=20,
                          min_lr_ratio=0.0, weight_decay=0.0)
  config.sample.num_tokens = 0
  return config
