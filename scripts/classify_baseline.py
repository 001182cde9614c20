"""The bag-of-words baseline of the stdlib package task: identifier counts and a logistic regression.

  python scripts/classify_baseline.py --data_dir=/tmp/stdlib_functions [--out=baseline.json]

Reads train.jsonl, test.jsonl and labels.json as scripts/stdlib_functions.py writes them. Each
text is the counts of its identifiers and keywords (`[A-Za-z_]\\w*`, case kept), tf-idf weighted
(sublinear tf); the inverse regularisation C of a multinomial logistic regression is chosen by
5-fold cross-validation on the training records grouped by file (no file in two folds, as the
test split), so the test split is read once, for the reported accuracy and macro-F1
(scikit-learn's f1_score(average='macro')). Needs scikit-learn (the `eval` extra).
"""
import json
import pathlib
import time

from absl import app, flags
from sklearn import feature_extraction, linear_model, metrics, model_selection, pipeline

flags.DEFINE_string('data_dir', None, 'The directory scripts/stdlib_functions.py wrote.')
flags.DEFINE_string('out', None, 'Also write the results to this JSON file.')

TOKEN_PATTERN = r'[A-Za-z_]\w*'
CS = (0.1, 1.0, 10.0, 100.0)


def read(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text(encoding='utf-8').splitlines() if line]


def fit_and_score(train: list[dict], test: list[dict], labels: list[str]) -> dict:
  """Fits on `train` (C chosen by file-grouped cross-validation) and scores on `test`."""
  model = pipeline.make_pipeline(
      feature_extraction.text.TfidfVectorizer(token_pattern=TOKEN_PATTERN, lowercase=False,
                                              sublinear_tf=True),
      linear_model.LogisticRegression(max_iter=2000))
  folds = model_selection.GroupKFold(n_splits=5)
  search = model_selection.GridSearchCV(model, {'logisticregression__C': CS},
                                        cv=folds, scoring='f1_macro')
  search.fit([r['text'] for r in train], [r['label'] for r in train],
             groups=[r['file'] for r in train])
  predicted = search.predict([r['text'] for r in test])
  true = [r['label'] for r in test]
  return {'accuracy': metrics.accuracy_score(true, predicted),
          'macro_f1': metrics.f1_score(true, predicted, labels=labels, average='macro',
                                       zero_division=0),
          'C': search.best_params_['logisticregression__C'],
          'features': len(search.best_estimator_[0].vocabulary_),
          'train_records': len(train), 'test_records': len(test)}


def main(argv):
  del argv
  data_dir = pathlib.Path(flags.FLAGS.data_dir)
  labels = json.loads((data_dir / 'labels.json').read_text())
  start = time.perf_counter()
  results = fit_and_score(read(data_dir / 'train.jsonl'), read(data_dir / 'test.jsonl'), labels)
  results['seconds'] = round(time.perf_counter() - start, 1)
  if flags.FLAGS.out:
    pathlib.Path(flags.FLAGS.out).write_text(json.dumps(results, indent=2))
  print(json.dumps(results))


if __name__ == '__main__':
  flags.mark_flag_as_required('data_dir')
  app.run(main)
