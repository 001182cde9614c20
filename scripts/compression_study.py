"""What pruning and distillation cost and buy (docs/compression.md), on one trained run.

  python scripts/compression_study.py --config=configs/stdlib_medium.py \
      --workdir=/tmp/stdlib_medium --out=/tmp/compression [--finetune_steps=60] \
      [--student_steps=300] [--batches=8]

- PRUNINGS: each one-shot (scripts/prune.py) and then fine-tuned for --finetune_steps
  (lepton-train with init_from the pruned checkpoint; the masked methods keep their masks).
- GRADUAL: the structured ones pruned instead while fine-tuning the run for as many steps
  (config.prune.schedule='gradual', by norm, reaching the sparsity at 3/4 of the steps), then
  shrunk to the smaller model (scripts/prune.py).
- A half-depth student trained for --student_steps from scratch and distilled from the run
  (config.objective='distill') at the same steps, on the run's tokenizer.
- The best fine-tuned pruned model with int8 weights (per channel).

Every model is scored on the run's eval split (its first --batches batches): loss, perplexity,
bits per byte, parameters, non-zero weights and the bytes of its weights. Each run is an
ordinary lepton run in OUT/<name> (its output in OUT/<name>.log); OUT/results.jsonl has a line per
model and a rerun skips the models it has. Writes OUT/table.md and OUT/compression.png.
"""
import json
import subprocess
import sys

from absl import flags
from etils import epath
import jax
import ml_collections
from ml_collections import config_flags

from lepton_jax import cli, config_lib, prune, quant, sample, sharding
from lepton_jax.ablation import runner
from lepton_jax.evals import language_model
from lepton_jax.model.config import ARCHITECTURE_FIELDS, STRUCTURED_METHODS, QuantConfig

flags.DEFINE_string('out', None, 'Directory for the pruned, fine-tuned and student runs.')
flags.DEFINE_integer('finetune_steps', 60, 'Fine-tuning steps after each one-shot pruning.',
                     lower_bound=1)
flags.DEFINE_integer('student_steps', 300, 'Training steps of each half-depth student.',
                     lower_bound=1)
flags.DEFINE_integer('batches', 8, 'Eval batches (of config.batch_size x config.seq_len).',
                     lower_bound=1)

# The stdlib runs are GQA with 3 query heads per kv group, so heads go a third at a time; heads
# are ranked by Taylor importance, and once by norm, as the gradual schedule ranks them.
PRUNINGS = {
    'magnitude 50%': {'method': 'magnitude', 'sparsity': 0.5},
    '2:4': {'method': 'n:m', 'n': 2, 'm': 4},
    'heads 1/3': {'method': 'heads', 'sparsity': 1 / 3, 'importance': 'taylor'},
    'heads 2/3': {'method': 'heads', 'sparsity': 2 / 3, 'importance': 'taylor'},
    'heads 2/3 by norm': {'method': 'heads', 'sparsity': 2 / 3, 'importance': 'norm'},
    'ffn 25%': {'method': 'ffn', 'sparsity': 0.25, 'importance': 'taylor'},
    'ffn 50%': {'method': 'ffn', 'sparsity': 0.5, 'importance': 'taylor'},
}
GRADUAL = ('heads 2/3', 'ffn 50%')
FINETUNE = {'optimizer.learning_rate': 5e-4, 'optimizer.warmup_steps': 10,
            'sample.num_tokens': 0, 'keep_checkpoints': 1}
DISTILL = {'objective': 'distill', 'distill.temperature': 2.0, 'distill.alpha': 0.5}


def dir_name(name: str) -> str:
  return ''.join(c if c.isalnum() else '_' for c in name)


class Study:
  """Runs and scores the models of the study, one results line each."""

  def __init__(self, config: ml_collections.ConfigDict, config_spec: str, overrides: dict,
               workdir: str, out: epath.Path, batches: int):
    # Every run gets the study's own --config.* overrides before its own.
    self.config, self.config_spec, self.overrides = config, config_spec, overrides
    self.workdir, self.out, self.batches = workdir, out, batches
    self.mesh, self.rules = sharding.make_mesh(config.mesh), config.mesh.rules
    self.results_path = out / 'results.jsonl'
    self.rows = {}
    if self.results_path.exists():
      for line in self.results_path.read_text().splitlines():
        row = json.loads(line)
        self.rows[row['name']] = row

  def config_with(self, overrides: dict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(self.config.to_dict())
    config.update_from_flattened_dict(overrides)
    return config

  def subprocess(self, name: str, args: list[str]) -> None:
    log = self.out / f'{dir_name(name)}.log'
    with open(log, 'w') as output:
      done = subprocess.run(args, stdout=output, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
      raise RuntimeError(f'{name} failed ({" ".join(args)}): '
                         f'{runner.last_line(log.read_text())} (all of it in {log})')

  def train(self, name: str, overrides: dict) -> str:
    run_dir = str(self.out / dir_name(name))
    steps = overrides['total_steps']
    overrides = {**self.overrides, 'eval_every_steps': steps, 'checkpoint_every_steps': steps,
                 **overrides}
    self.subprocess(name, runner.command(self.config_spec, run_dir, overrides))
    return run_dir

  def score(self, name: str, stage: str, run_dir: str, overrides: dict,
            quant_config: QuantConfig | None = None) -> dict:
    """Scores the model in `run_dir`, trained with `overrides` (int8 with `quant_config`), and
    records its line."""
    config = self.config_with(overrides)
    model, variables, tokenizer = sample.load(config, run_dir)
    with sharding.use_mesh(self.mesh, self.rules):
      if quant_config is not None:
        model, variables = quant.quantize(model, variables, quant_config, self.mesh, self.rules)
      metrics = language_model.LanguageModel(config, tokenizer, model, self.mesh, self.rules,
                                             batches=self.batches)(variables)
    weights = {k: variables[k] for k in ('params', 'quant') if k in variables}
    row = {'name': name, 'stage': stage, 'run': run_dir, 'overrides': overrides,
           'parameters': sum(leaf.size for leaf in jax.tree.leaves(weights)),
           'nonzero': prune.nonzero_count(weights), 'bytes': quant.variable_bytes(weights),
           **metrics}
    self.rows[name] = row
    with open(self.results_path, 'a') as results:
      results.write(json.dumps(row) + '\n')
    print(name, row, flush=True)
    return row

  def prune_script(self, name: str, workdir: str, out: str, overrides: dict) -> None:
    """scripts/prune.py of the run in `workdir` into `out`, with the study's and `overrides`."""
    self.subprocess(name, [sys.executable, 'scripts/prune.py', f'--config={self.config_spec}',
                           f'--workdir={workdir}', f'--out={out}',
                           *(f'--config.{k}={runner.flag_value(v)}'
                             for k, v in {**self.overrides, **overrides}.items())])

  def pruned(self, name: str, settings: dict, finetune_steps: int) -> None:
    prune_overrides = {f'prune.{key}': value for key, value in settings.items()}
    one_shot = str(self.out / dir_name(name))
    if name not in self.rows:
      self.prune_script(name, self.workdir, one_shot, prune_overrides)
      self.score(name, 'one-shot', one_shot, {})
    tuned = f'{name}, fine-tuned'
    if tuned in self.rows:
      return
    # The structured methods' smaller shape, which the fine-tune's config must give; the masked
    # ones prune again at its first step, finding the same zeros, and keep them.
    pruned_model = config_lib.read_run_config(one_shot).model
    overrides = {**FINETUNE, 'init_from': f'workdir:{one_shot}',
                 'total_steps': finetune_steps,
                 **{f'model.{k}': pruned_model[k] for k in ARCHITECTURE_FIELDS},
                 **({} if settings['method'] in STRUCTURED_METHODS else prune_overrides)}
    self.score(tuned, 'fine-tuned', self.train(tuned, overrides), overrides)

  def gradual(self, name: str, settings: dict, steps: int) -> None:
    gradual = f'{name}, gradual'
    if gradual in self.rows:
      return
    pruning = {'prune.method': settings['method'], 'prune.sparsity': settings['sparsity']}
    overrides = {**FINETUNE, 'init_from': f'workdir:{self.workdir}', 'total_steps': steps,
                 **pruning, 'prune.schedule': 'gradual', 'prune.end_step': steps * 3 // 4,
                 'prune.every_steps': max(1, steps // 4)}
    masked = self.train(f'{gradual} (masked)', overrides)
    smaller = str(self.out / dir_name(gradual))
    tokenizer = {'data.tokenizer_path': config_lib.read_run_config(masked).data.tokenizer_path}
    self.prune_script(gradual, masked, smaller, {**tokenizer, **pruning})
    self.score(gradual, 'gradual', smaller, {})

  def students(self, steps: int) -> None:
    # The run's own tokenizer, as its config.json resolved it (the teacher's, for distillation).
    tokenizer_path = config_lib.read_run_config(self.workdir).data.tokenizer_path
    half = {'model.num_layers': self.config.model.num_layers // 2, 'total_steps': steps,
            'data.tokenizer_path': tokenizer_path, 'sample.num_tokens': 0}
    distilled = {**half, **DISTILL, 'distill.teacher': f'workdir:{self.workdir}'}
    for name, overrides in (('half depth, from scratch', half),
                            ('half depth, distilled', distilled)):
      if name not in self.rows:
        self.score(name, 'student', self.train(name, overrides), half)

  def int8(self) -> None:
    tuned = [row for row in self.rows.values() if row['stage'] == 'fine-tuned']
    best = min(tuned, key=lambda row: row['bits_per_byte'])
    name = f'{best["name"]}, int8 weights'
    if name not in self.rows:
      self.score(name, 'int8', best['run'], best['overrides'], QuantConfig(weights='int8'))


def table(rows: list[dict]) -> str:
  base = rows[0]
  lines = ['| model | stage | parameters | non-zero | weight bytes | eval loss | perplexity | '
           'bits/byte | change |', '|---|---|---|---|---|---|---|---|---|']
  for row in rows:
    change = 100 * (row['bits_per_byte'] / base['bits_per_byte'] - 1)
    lines.append(f'| {row["name"]} | {row["stage"]} | {row["parameters"]:,} | '
                 f'{row["nonzero"]:,} | {row["bytes"] / 2**20:.1f} MiB | {row["loss"]:.4f} | '
                 f'{row["perplexity"]:.2f} | {row["bits_per_byte"]:.4f} | {change:+.1f}% |')
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict], path: epath.Path) -> None:
  """Bits per byte against non-zero weights: one marker per stage."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, ax = plt.subplots(figsize=(8, 5))
  markers = {'trained': '*', 'one-shot': 'x', 'fine-tuned': 'o', 'gradual': 'P', 'student': 's',
             'int8': 'D'}
  for stage, marker in markers.items():
    chosen = [row for row in rows if row['stage'] == stage]
    ax.scatter([row['nonzero'] for row in chosen], [row['bits_per_byte'] for row in chosen],
               marker=marker, label=stage, s=60)
    for row in chosen:
      label = row['name']
      for stage in (', fine-tuned', ', gradual', ', int8 weights'):
        label = label.replace(stage, '')
      ax.annotate(label, (row['nonzero'], row['bits_per_byte']), fontsize=7, xytext=(4, 3),
                  textcoords='offset points')
  ax.set_xlabel('non-zero weights')
  ax.set_ylabel('eval bits per byte')
  ax.legend(fontsize='small')
  ax.grid(alpha=0.3)
  figure.savefig(path, dpi=120, bbox_inches='tight')
  plt.close(figure)


def main(argv):
  f = cli.FLAGS
  with cli.command_line('compression_study', argv):
    if not f.out:
      raise ValueError('--out is required: the directory for the study runs and results')
    if any(key.startswith('prune.') or key.startswith('distill.')
           for key in config_flags.get_override_values(f['config'])):
      raise ValueError('compression_study sets config.prune and config.distill itself; drop the '
                       '--config.prune.* and --config.distill.* flags')
    out = epath.Path(f.out)
    out.mkdir(parents=True, exist_ok=True)
    study = Study(f.config, config_flags.get_config_filename(f['config']),
                  config_flags.get_override_values(f['config']), f.workdir, out, f.batches)
    if 'trained' not in study.rows:
      study.score('trained', 'trained', f.workdir, {})
    for name, settings in PRUNINGS.items():
      study.pruned(name, settings, f.finetune_steps)
    for name in GRADUAL:
      study.gradual(name, PRUNINGS[name], f.finetune_steps)
    study.students(f.student_steps)
    study.int8()
  # Each pruning's one-shot and fine-tuned lines together, whatever order the runs finished in.
  order = ['trained', *(n for p in PRUNINGS for n in (p, f'{p}, fine-tuned', f'{p}, gradual'))]
  rows = sorted(study.rows.values(),
                key=lambda row: order.index(row['name']) if row['name'] in order else len(order))
  (out / 'table.md').write_text(table(rows))
  plot(rows, out / 'compression.png')
  print(table(rows), flush=True)


if __name__ == '__main__':
  cli.run(main)
