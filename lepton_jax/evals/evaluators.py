"""Evaluators from the config: the validation loss, and `config.evals.NAME = dict(type=...)`.

Training runs each at its cadence and logs its metrics as eval/NAME/METRIC; the default one,
language modelling on the run's own eval split every `config.eval_every_steps` steps, logs
eval/loss, eval/perplexity, eval/accuracy and eval/bits_per_byte (for config.objective classify
and dpo, that objective's metrics instead: evals/objective.py). lepton-eval runs them all once.

  config.evals.stdlib = dict(type='lm', every=500, data=dict(source='stdlib'))
  config.evals.arc = dict(type='multiple_choice', path='/data/arc_easy.jsonl', every=1000)
  config.evals.humaneval = dict(type='humaneval', limit=40)

Types and their options (besides `type` and `every`, which defaults to config.eval_every_steps):

  lm               data (config.data fields to change), batches (default config.eval_batches)
  multiple_choice  path, limit, batch_size                      (record formats: evals/tasks.py)
  cloze            path, limit, batch_size
  perplexity       path, limit, batch_size
  generation       path, limit, batch_size, max_new_tokens (32), until (('\\n',))
  humaneval        limit, batch_size, max_new_tokens (64)

(A default max_new_tokens is capped at half the model's max_seq_len.)

limit: only the first records; batch_size: rows per scoring call (default config.batch_size).
Task files are read, and data tokenized, when the evaluators are built: before the first step.
"""
from collections.abc import Callable, Sequence
import dataclasses

import jax
import ml_collections

from lepton_jax import data
from lepton_jax.evals import generation, language_model, objective, scoring, tasks
from lepton_jax.model import Transformer

Metrics = dict[str, float]


@dataclasses.dataclass(frozen=True)
class Context:
  """What every evaluator is built from."""
  config: ml_collections.ConfigDict
  model: Transformer
  tokenizer: data.Tokenizer
  mesh: jax.sharding.Mesh
  rules: tuple

  def scorer(self, spec: dict) -> scoring.Scorer:
    return scoring.Scorer(self.model, self.mesh, self.rules,
                          spec.get('batch_size', self.config.batch_size))

  def completer(self, spec: dict, default_max_new_tokens: int) -> generation.Completer:
    """The default is capped at half the model's window, to leave room for the prompt."""
    default_max_new_tokens = min(default_max_new_tokens, self.model.cfg.max_seq_len // 2)
    return generation.Completer(self.model, self.tokenizer,
                                spec.get('batch_size', self.config.batch_size),
                                spec.get('max_new_tokens', default_max_new_tokens),
                                spec.get('until', ('\n',)))


def _language_model(spec: dict, ctx: Context) -> Callable[[dict], Metrics]:
  return language_model.LanguageModel(ctx.config, ctx.tokenizer, ctx.model, ctx.mesh, ctx.rules,
                                      spec.get('data'), spec.get('batches'))


def _scored_task(kind: str, score):
  def build(spec: dict, ctx: Context) -> Callable[[dict], Metrics]:
    records = tasks.read_records(spec['path'], kind, spec.get('limit', 0))
    scorer = ctx.scorer(spec)
    return lambda variables: score(scorer, ctx.tokenizer, variables, records)
  return build


def _generation(spec: dict, ctx: Context) -> Callable[[dict], Metrics]:
  records = tasks.read_records(spec['path'], 'generation', spec.get('limit', 0))
  completer = ctx.completer(spec, default_max_new_tokens=32)
  return lambda variables: tasks.exact_match(completer, variables, records)


def _humaneval(spec: dict, ctx: Context) -> Callable[[dict], Metrics]:
  problems = tasks.humaneval_problems(spec.get('limit', 0))
  solutions = [{'context': p['prompt'], 'continuation': p['canonical_solution']} for p in problems]
  first_lines = [tasks.first_line_record(p) for p in problems]
  scorer, completer = ctx.scorer(spec), ctx.completer(spec, default_max_new_tokens=64)

  def evaluate(variables) -> Metrics:
    solved = tasks.cloze(scorer, ctx.tokenizer, variables, solutions)
    return {'loss': solved['loss'], 'bits_per_byte': solved['bits_per_byte'],
            **tasks.exact_match(completer, variables, first_lines)}
  return evaluate


# type -> (its options, builder(spec, context) -> evaluate(variables) -> metrics).
TYPES = {
    'lm': (('data', 'batches'), _language_model),
    'multiple_choice': (('path', 'limit', 'batch_size'),
                        _scored_task('multiple_choice', tasks.multiple_choice)),
    'cloze': (('path', 'limit', 'batch_size'), _scored_task('cloze', tasks.cloze)),
    'perplexity': (('path', 'limit', 'batch_size'), _scored_task('perplexity', tasks.perplexity)),
    'generation': (('path', 'limit', 'batch_size', 'max_new_tokens', 'until'), _generation),
    'humaneval': (('limit', 'batch_size', 'max_new_tokens'), _humaneval),
}
REQUIRED = {'multiple_choice': ('path',), 'cloze': ('path',), 'perplexity': ('path',),
            'generation': ('path',)}


@dataclasses.dataclass(frozen=True)
class Evaluator:
  name: str  # '' for the default: language modelling on the run's eval split.
  every: int
  evaluate: Callable[[dict], Metrics]

  def due(self, step: int, total_steps: int) -> bool:
    return step % self.every == 0 or step == total_steps

  def __call__(self, variables) -> Metrics:
    prefix = f'eval/{self.name}/' if self.name else 'eval/'
    return {prefix + key: value for key, value in self.evaluate(variables).items()}


def check_spec(name: str, spec: dict) -> None:
  """Raises a one-line ValueError naming the config key of a bad evaluator spec."""
  key = f'config.evals.{name}'
  if spec.get('type') not in TYPES:
    raise ValueError(f"{key}.type={spec.get('type')!r}: expected one of {tuple(TYPES)}")
  options, _ = TYPES[spec['type']]
  unknown = sorted(set(spec) - {'type', 'every', *options})
  if unknown:
    raise ValueError(f"{key}.{unknown[0]}: not an option of type {spec['type']!r}; it takes "
                     f"{('every', *options)}")
  missing = [option for option in REQUIRED.get(spec['type'], ()) if option not in spec]
  if missing:
    raise ValueError(f"{key}.{missing[0]} is required for type {spec['type']!r}")
  for option in ('every', 'limit', 'batch_size', 'batches', 'max_new_tokens'):
    if option in spec and not (isinstance(spec[option], int) and spec[option] > 0):
      raise ValueError(f'{key}.{option}={spec[option]!r}: must be a positive integer')


def build(config: ml_collections.ConfigDict, model, tokenizer, mesh: jax.sharding.Mesh, rules,
          specs: dict | None = None, reference_logps=None) -> list[Evaluator]:
  """The default evaluator and one per entry of `config.evals` (and of `specs`, if given);
  `reference_logps`: a dpo run's precomputed reference (objective.ObjectiveEval)."""
  ctx = Context(config, model, tokenizer, mesh, tuple(rules))
  default = (objective.ObjectiveEval(config, tokenizer, model, mesh, rules, reference_logps)
             if config.objective in objective.OBJECTIVES else _language_model({}, ctx))
  evaluators = [Evaluator('', config.eval_every_steps, default)]
  for name, spec in {**config.evals.to_dict(), **(specs or {})}.items():
    check_spec(name, spec)
    _, make = TYPES[spec['type']]
    evaluators.append(Evaluator(name, spec.get('every', config.eval_every_steps), make(spec, ctx)))
  return evaluators


def due(evaluators: Sequence[Evaluator], step: int, total_steps: int) -> list[Evaluator]:
  return [e for e in evaluators if e.due(step, total_steps)]


def run(evaluators: Sequence[Evaluator], variables) -> Metrics:
  metrics = {}
  for evaluator in evaluators:
    metrics.update(evaluator(variables))
  return metrics
