"""The sequence-classification variant of each family: `*ForSequenceClassification` directories.

transformers' classifiers are the family's decoder without its LM head plus `score`, a Linear
[num_labels, hidden] without bias on the final hidden state of each row's last non-padding token
(the rightmost position whose id is not `pad_token_id`): lepton's `head='classify'` with
`pool='last'`. config.json gives the labels (`id2label`) and `pad_token_id`.
"""
from lepton_jax.hf import family
from lepton_jax.hf.family import TensorMap
from lepton_jax.model import ModelConfig

# model_type -> its transformers classifier.
ARCHITECTURES = {'llama': 'LlamaForSequenceClassification',
                 'mistral': 'MistralForSequenceClassification',
                 'qwen2': 'Qwen2ForSequenceClassification',
                 'qwen3': 'Qwen3ForSequenceClassification',
                 'gpt2': 'GPT2ForSequenceClassification'}


def is_classifier(hf_config: dict) -> bool:
  return any(a.endswith('ForSequenceClassification') for a in hf_config.get('architectures') or ())


def read_config(hf_config: dict) -> dict:
  """The ModelConfig head fields of a config.json: the classify head for a classifier."""
  if not is_classifier(hf_config):
    return {}
  labels = hf_config.get('id2label') or {}
  num_labels = len(labels) or hf_config.get('num_labels', 2)
  pad_id = hf_config.get('pad_token_id')
  if pad_id is None:
    raise family.unsupported('pad_token_id', None, 'a classifier pools the last token that is '
                             'not padding, so it needs a pad id')
  return dict(head='classify', num_labels=num_labels, pool='last', pad_id=int(pad_id))


def write_config(model_type: str, cfg: ModelConfig, labels=None) -> dict:
  """The config.json fields that make a family's directory its classifier (`labels`: the label
  names, by default LABEL_0, LABEL_1, ... as transformers names them)."""
  if cfg.pool != 'last':
    raise family.unexpressible(ARCHITECTURES[model_type], 'pool', cfg.pool,
                               "(transformers' classifiers pool the last token)")
  names = list(labels) if labels else [f'LABEL_{i}' for i in range(cfg.num_labels)]
  if len(names) != cfg.num_labels:
    raise ValueError(f'hf.save: {len(names)} label names for a head of {cfg.num_labels} labels')
  return dict(architectures=[ARCHITECTURES[model_type]], pad_token_id=cfg.pad_id,
              id2label={str(i): str(name) for i, name in enumerate(names)},
              label2id={str(name): i for i, name in enumerate(names)})


def tensors(cfg: ModelConfig) -> dict[str, TensorMap]:
  """The score head's tensor (none for the lm head)."""
  if cfg.head != 'classify':
    return {}
  return {'score/kernel': TensorMap('score.weight', transpose=True)}
