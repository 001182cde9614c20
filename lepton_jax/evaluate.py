"""Evaluate a trained run or a Hugging Face model: `lepton-eval`.

  lepton-eval --config=configs/stdlib_tiny.py --workdir=/tmp/stdlib_tiny [--step=400]
  lepton-eval --hf_dir=/models/Qwen2.5-0.5B [--config=...] --tasks=humaneval
  lepton-eval ... --tasks=multiple_choice:arc.jsonl,generation:qa.jsonl --out=results.json

Reads params only (any optimizer, onto the mesh `config.mesh` describes) and runs the validation
loss on the config's data and every evaluator of `config.evals` (lepton_jax/evals/evaluators.py),
with the metric names training logs (eval/loss, eval/bits_per_byte, eval/NAME/acc, ...), plus
what the model costs (cost/params, cost/param_bytes[/DTYPE], cost/forward_tokens_per_sec,
cost/eval_step_peak_bytes). Prints a markdown table; --out also writes the results as JSON
(and, for a config.objective='classify' run, the confusion matrix in it and as OUT.confusion.png).

With --hf_dir the model and tokenizer are the directory's; the config (default: the base one)
gives the data, the mesh and the evaluators.
"""
import json

from absl import app, flags
from etils import epath
import jax
import ml_collections

from lepton_jax import cli, config_lib, data, evals, lora, objectives, quant, sample, sharding
from lepton_jax.evals import cost
from lepton_jax.evals import objective as objective_eval
from lepton_jax.model.config import QuantConfig

TASK_TYPES = tuple(t for t in evals.TYPES if t not in ('lm', 'humaneval'))  # Those with a file.


def define_flags() -> None:
  """lepton-eval's own flags, besides cli's (defined when it runs, never on import)."""
  flags.DEFINE_string('hf_dir', None, 'Evaluate this Hugging Face model directory instead of a '
                      '--workdir run.')
  flags.DEFINE_integer('step', None, 'Checkpoint step of the --workdir run (default: the '
                       'latest).')
  flags.DEFINE_list('tasks', [], 'Task files besides config.evals, each TYPE:PATH (name: the '
                    "file name's stem) or humaneval; TYPE is one of " + ', '.join(TASK_TYPES) + '.')
  flags.DEFINE_string('out', None, 'Also write the results to this JSON file.')
  flags.DEFINE_bool('cost', True, 'Measure parameters, forward tokens/s and compiled memory.')


def load(config: ml_collections.ConfigDict, workdir: str | None = None,
         hf_dir: str | None = None, step: int | None = None):
  """(model, variables, tokenizer) of a run's checkpoint (`workdir`, `step`) or a Hugging Face
  directory, the variables placed on `config.mesh` and quantized as config.quant says."""
  if hf_dir:
    from lepton_jax import hf  # The hf extra, only when asked for.
    mesh = sharding.make_mesh(config.mesh)
    model, variables = hf.load(hf_dir, mesh=mesh, rules=config.mesh.rules)
    model, variables = quant.quantize(model, variables, QuantConfig.from_config(config.quant),
                                      mesh, config.mesh.rules)
    return model, variables, hf.load_tokenizer(hf_dir)
  return sample.load(config, workdir, step)


def task_specs(tasks: list[str]) -> dict[str, dict]:
  """config.evals-style specs of --tasks entries (TYPE:PATH, or humaneval)."""
  specs = {}
  for task in tasks:
    kind, _, path = task.partition(':')
    if not (kind in TASK_TYPES and path or kind == 'humaneval' and not path):
      raise ValueError(f'--tasks entry {task!r}: expected TYPE:PATH with TYPE one of '
                       f'{TASK_TYPES}, or humaneval')
    name = epath.Path(path).stem if path else kind
    if name in specs:
      raise ValueError(f'--tasks: two tasks are named {name!r}; rename one of the files')
    specs[name] = {'type': kind, 'path': path} if path else {'type': kind}
  return specs


def evaluate(config: ml_collections.ConfigDict, model, variables, tokenizer,
             tasks: dict[str, dict] | None = None, measure_cost: bool = True,
             adapter: str | None = None, confusion: list | None = None) -> dict[str, float]:
  """Every evaluator of `config` (and `tasks`) once, and the model's cost; with `variables` a
  lora.AdapterSet, of its adapter `adapter`. A classify run's confusion matrix (true x
  predicted) is appended to `confusion` when given."""
  variables = lora.chosen(variables, adapter)
  mesh, rules = sharding.make_mesh(config.mesh), config.mesh.rules
  with sharding.use_mesh(mesh, rules):
    evaluators = evals.build(config, model, tokenizer, mesh, rules, tasks)
    metrics = evals.run(evaluators, variables)
    if confusion is not None and getattr(evaluators[0].evaluate, 'confusion', None) is not None:
      confusion.append(evaluators[0].evaluate.confusion.tolist())
    if measure_cost:
      weights = {name: variables[name] for name in ('params', 'quant') if name in variables}
      # The step the run evaluates with, on the split's first batch: a classify or dpo model
      # reads labels or preference pairs, not a token window.
      first_batch = data.make_eval_batches(config, tokenizer, 0, 1)[0]
      measured = {**cost.param_counts(weights),  # int8 weights and their scales included.
                  **cost.forward_cost(model, variables, mesh, rules, first_batch,
                                      objectives.from_config(config, model))}
      metrics.update({f'cost/{key}': value for key, value in measured.items()})
  return metrics


def markdown_table(metrics: dict[str, float]) -> str:
  def number(value) -> str:
    if isinstance(value, int):
      return str(value)
    return f'{value:.4f}' if abs(value) < 100 else f'{value:.1f}'
  rows = [f'| {key} | {number(value)} |' for key, value in metrics.items()]
  return '\n'.join(['| metric | value |', '|---|---|', *rows])


def main(argv):
  f = cli.FLAGS
  if f.config is None and not f.hf_dir:
    raise app.UsageError('--config is required (with --workdir), or give --hf_dir')
  if bool(f.workdir) == bool(f.hf_dir):
    raise app.UsageError('give one of --workdir (a lepton run) and --hf_dir')
  config = f.config if f.config is not None else config_lib.base_config()
  with cli.command_line('lepton-eval', argv, needs_workdir=False):
    config_lib.validate(config)
    tasks = task_specs(f.tasks)
    model, variables, tokenizer = load(config, f.workdir, f.hf_dir, f.step)
    confusion = []
    metrics = evaluate(config, model, variables, tokenizer, tasks, f.cost,
                       confusion=confusion)
    if jax.process_index() == 0:
      if f.out:
        source = {'hf_dir': f.hf_dir} if f.hf_dir else {'workdir': f.workdir, 'step': f.step}
        if confusion:
          source['confusion'] = confusion[0]
          objective_eval.plot_confusion(confusion[0], config.data.labels,
                                         str(epath.Path(f.out).with_suffix('.confusion.png')))
        epath.Path(f.out).write_text(json.dumps({**source, 'metrics': metrics}, indent=2))
      print(markdown_table(metrics), flush=True)


def run():
  """Console-script entry point (`lepton-eval`)."""
  cli.define_flags()
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
