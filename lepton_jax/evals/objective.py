"""The run's own objective on its eval split, for objectives other than lm and sft (whose
language-model evaluation is language_model.py): classify and dpo.

  classify  eval/loss, eval/accuracy, eval/macro_f1, from the confusion matrix summed over the
            batches (`confusion`, true label x predicted; `plot_confusion` draws it);
  dpo       eval/loss and TRL's eval/rewards/chosen, rewards/rejected, rewards/accuracies,
            rewards/margins, logps/chosen, logps/rejected.

Every number is a total over all eval batches divided by the total count (records, pairs), so it
does not depend on how the split is cut into batches.
"""
import functools

import jax
import ml_collections
import numpy as np

from lepton_jax import data, objectives, sharding, steps

OBJECTIVES = ('classify', 'dpo')  # Those evaluated here; the others as language models.


def macro_f1(confusion_CC: np.ndarray) -> float:
  """The unweighted mean over labels of F1 = 2 tp / (2 tp + fp + fn); a label that is neither
  true nor predicted anywhere scores 0, as scikit-learn's f1_score(average='macro') does."""
  confusion_CC = np.asarray(confusion_CC, np.float64)
  tp = np.diag(confusion_CC)
  denominator = confusion_CC.sum(0) + confusion_CC.sum(1)  # 2 tp + fp + fn
  return float(np.mean(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)))


def plot_confusion(confusion_CC: np.ndarray, labels, path: str) -> None:
  """The confusion matrix as a PNG: rows the true labels, columns the predicted ones."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (an extra, only when plotting)
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  confusion_CC = np.asarray(confusion_CC)
  size = 1.5 + 0.5 * len(labels)
  figure, axes = pyplot.subplots(figsize=(size + 1, size))
  image = axes.imshow(confusion_CC, cmap='Blues')
  names = [str(label) for label in labels]
  axes.set(xticks=range(len(names)), yticks=range(len(names)), xlabel='predicted',
           ylabel='true', title='confusion matrix')
  axes.set_xticklabels(names, rotation=45, ha='right')
  axes.set_yticklabels(names)
  for (true, predicted), count in np.ndenumerate(confusion_CC):
    axes.text(predicted, true, f'{count:g}', ha='center', va='center',
              color='white' if count > confusion_CC.max() / 2 else 'black')
  figure.colorbar(image)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  pyplot.close(figure)


class ObjectiveEval:
  """Evaluates `config.objective` on the eval split of `config.data` (with DPO's reference
  log-probs from `reference_logps`, dpo_reference.precompute, when given)."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: data.Tokenizer, model,
               mesh: jax.sharding.Mesh, rules, reference_logps=None):
    self.objective = objectives.from_config(config, model)
    rows = config.batch_size // jax.process_count()
    first = jax.process_index() * rows
    self._batches = [{k: v[first:first + rows] for k, v in batch.items()}
                     for batch in data.make_eval_batches(config, tokenizer, 0, 1,
                                                            reference_logps)]
    self._batch_sharding = sharding.batch_sharding(mesh, rules)
    self._eval_fn = jax.jit(functools.partial(steps.eval_step, model=model,
                                              objective=self.objective),
                            out_shardings=sharding.replicated(mesh))
    self.confusion = None  # classify: the last evaluation's confusion matrix.

  def __call__(self, variables) -> dict[str, float]:
    totals = None
    for batch in self._batches:
      sums = self._eval_fn(variables, {
          k: jax.make_array_from_process_local_data(self._batch_sharding, v)
          for k, v in batch.items()})
      sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
      totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    loss_sum = totals.pop('loss_sum')
    metrics = {k: float(v) for k, v in self.objective.metrics(loss_sum, totals, '').items()}
    if 'confusion' in totals:
      self.confusion = totals['confusion']
      metrics['macro_f1'] = macro_f1(self.confusion)
    return metrics
