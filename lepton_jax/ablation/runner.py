"""Runs a sweep's cells, each an ordinary lepton-train run in WORKDIR/<cell name>.

A cell whose run finished has WORKDIR/<name>/result.json (status ok) and is skipped; one that was
interrupted has checkpoints, and lepton-train resumes it; one that failed is reported, and tried
again by the next invocation. The run's output goes to WORKDIR/<name>/train.log.
"""
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

from etils import epath
import ml_collections

from lepton_jax import checkpoint, config_lib, data, paths, sharding, train_state
from lepton_jax.ablation import grid
from lepton_jax.evals import cost
from lepton_jax.model import ModelConfig, Transformer

RESULT = 'result.json'


def flag_value(value) -> str:
  """A value as --config.KEY=VALUE takes it."""
  return value if isinstance(value, str) else repr(value)


def command(config_spec: str, workdir: str, overrides: dict, extra_flags=()) -> list[str]:
  """The lepton-train command of one run."""
  return [sys.executable, '-m', 'lepton_jax.train', f'--config={config_spec}',
          f'--workdir={workdir}', *extra_flags,
          *(f'--config.{key}={flag_value(value)}' for key, value in overrides.items())]


def shared_tokenizer(config: ml_collections.ConfigDict, cells: list[grid.Cell],
                     workdir: str) -> dict:
  """Overrides that give every run one SentencePiece model, trained once into WORKDIR: cells then
  compare models, not vocabularies (unless the sweep varies the data itself). Runs that start
  from trained weights (config.init_from) already share their source's tokenizer."""
  varies_data = any(key.startswith('data.') for cell in cells for key in cell.overrides)
  if (config.data.tokenizer != 'sentencepiece' or config.data.tokenizer_path or varies_data or
      config.init_from):
    return {}
  return {'data.tokenizer_path': data.build_tokenizer(config.data, workdir).path}


def read_result(workdir: epath.Path, cell: grid.Cell) -> dict | None:
  path = workdir / cell.name / RESULT
  if not path.exists():
    return None
  result = json.loads(path.read_text())
  if 'footprint' not in result:  # Written before results held one.
    result['footprint'] = footprint(workdir / cell.name)
  return result


def run_cell(cell: grid.Cell, config_spec: str, workdir: epath.Path, base_overrides: dict,
             extra_flags=()) -> dict:
  """Runs (or resumes) one cell and writes its result: status, final metrics, eval curves,
  parameters, the last checkpoint's footprint, median tokens/s and wall time; for a failed run,
  its last line of output."""
  run_dir = workdir / cell.name
  run_dir.mkdir(parents=True, exist_ok=True)
  overrides = {**base_overrides, **cell.overrides}
  argv = command(config_spec, os.fspath(run_dir), overrides, extra_flags)
  start = time.perf_counter()
  with (run_dir / 'train.log').open('a') as log:
    log.write(' '.join(argv) + '\n')
    log.flush()
    finished = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False)
  result = {'name': cell.name, 'group': cell.group, 'labels': dict(cell.labels),
            'seed': cell.seed, 'overrides': overrides,
            'wall_s': round(time.perf_counter() - start, 1), 'command': argv,
            'params': param_count(run_dir), 'footprint': footprint(run_dir),
            **read_metrics(run_dir)}
  if finished.returncode == 0:
    result['status'] = 'ok'
  else:
    result['status'] = 'failed'
    result['error'] = last_line((run_dir / 'train.log').read_text())
  paths.write_atomically(run_dir / RESULT, json.dumps(result, indent=1).encode())
  return result


def last_line(text: str) -> str:
  lines = [line for line in text.splitlines() if line.strip()]
  return lines[-1].strip() if lines else '(no output)'


def read_metrics(run_dir: epath.Path) -> dict:
  """The run's last eval metrics, every eval/* curve and the median tokens/s."""
  path = run_dir / 'metrics.jsonl'
  records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
  final, curves = {}, {}
  for record in records:
    for key, value in record.items():
      if key.startswith('eval/'):
        final[key] = value
        curves.setdefault(key, []).append((record['step'], value))
  speeds = [r['tokens_per_sec'] for r in records if 'tokens_per_sec' in r]
  return {'steps': records[-1]['step'] if records else 0, 'final': final, 'curves': curves,
          'tokens_per_sec': statistics.median(speeds) if speeds else None}


def param_count(run_dir: epath.Path) -> int | None:
  """Parameters of the run's model, from the config.json lepton-train resolved (None if the run
  never started)."""
  run_config = config_lib.read_run_config(run_dir)
  if run_config is None:
    return None
  model = Transformer(ModelConfig.from_config(run_config.model, run_config.get('lora'),
                                              peft_config=run_config.get('peft')))
  abstract = sharding.unbox_abstract(train_state.boxed_variables(model, run_config.seq_len))
  return cost.param_counts(abstract['params'])['params']


def footprint(run_dir: epath.Path) -> dict:
  """Trainable parameters, optimizer-state bytes and checkpoint bytes of the run's last
  checkpoint (checkpoint.Checkpointer.footprint); {} before its first."""
  if not (run_dir / 'checkpoints').exists():
    return {}
  checkpointer = checkpoint.Checkpointer(os.fspath(run_dir), read_only=True)
  step = checkpointer.latest_step()
  measured = checkpointer.footprint(step) if step is not None else {}
  checkpointer.close()
  return measured


@dataclasses.dataclass
class Progress:
  """One line per run: [k/n] name: what happened."""
  total: int
  done: int = 0

  def report(self, cell: grid.Cell, what: str) -> None:
    self.done += 1
    print(f'[{self.done}/{self.total}] {cell.name}: {what}', flush=True)
