"""Run a grid of config overrides at several seeds and collect a table and plots.

  python scripts/ablate.py --config=configs/ablation_cpu.py --workdir=/tmp/ablate \
      --sweep='model.mlp=swiglu,gelu' --sweep='model.positions=rope,learned' --seeds=3 \
      [--config.total_steps=200 ...]
  python scripts/ablate.py --sweep=configs/sweeps/gated_mlp.py --workdir=/tmp/gated_mlp

Each run is an ordinary lepton-train run in WORKDIR/<axis=label,...,seed=N>; runs that finished
are skipped and interrupted ones resume, so the same command continues a sweep. The results go to
WORKDIR/results.jsonl, table.md, curves.png, final.png and budget.png
(lepton_jax/ablation/report.py).
--shard=i/n runs every n-th cell from the i-th (one host each, sharing WORKDIR); --collect then
writes the table from what all of them finished. A failed run is reported, and the sweep goes on.
"""
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from lepton_jax import cli, config_lib
from lepton_jax.ablation import grid, report, runner

flags.DEFINE_multi_string('sweep', [], "An axis, KEY=VALUE,VALUE,... (e.g. 'model.mlp=swiglu,"
                          "gelu'), or a sweep file FILE.py[:ARG] (configs/sweeps/).")
flags.DEFINE_integer('seeds', None, 'Runs per cell, with config.seed + 0, 1, ... (default: the '
                     "sweep file's, else 1).", lower_bound=1)
flags.DEFINE_string('shard', '0/1', 'i/n: run only every n-th cell, starting at the i-th.')
flags.DEFINE_bool('collect', False, 'Run nothing; write the table from the finished runs.')
flags.DEFINE_string('metric', 'eval/bits_per_byte', 'The metric of the table and plots.')


def main(argv):
  f = cli.FLAGS
  with cli.command_line('ablate', argv):
    sweep = grid.combine(f.sweep)
    if not sweep.axes:
      raise ValueError('--sweep: give at least one axis or a sweep file')
    if f.config is not None:
      spec, base = config_flags.get_config_filename(f['config']), f.config
      overrides = config_flags.get_override_values(f['config'])
    elif sweep.config:
      spec, base, overrides = sweep.config, config_lib.load_file(sweep.config), {}
    else:
      raise ValueError('--config is required: the sweep file names no config')
    spec = f'{epath.Path(spec.partition(":")[0]).resolve()}' + ''.join(spec.partition(':')[1:])
    cells = grid.cells(sweep.axes, base, f.seeds or sweep.seeds or 1)
    workdir = epath.Path(f.workdir)
    if not f.collect:
      workdir.mkdir(parents=True, exist_ok=True)
      overrides.update(runner.shared_tokenizer(base, cells, f.workdir))
      mine = grid.shard(cells, f.shard)
      extra = [f'--cpu_devices={f.cpu_devices}'] if f.cpu_devices else []
      progress = runner.Progress(len(mine))
      for cell in mine:
        done = runner.read_result(workdir, cell)
        if done and done['status'] == 'ok':
          progress.report(cell, 'complete, skipped')
          continue
        result = runner.run_cell(cell, spec, workdir, overrides, extra)
        final = result['final'].get(f.metric)
        progress.report(cell, f"{result['status']} in {result['wall_s']:.0f}s" + (
            f', {f.metric} {final:.4f}' if final is not None else '') + (
            f": {result['error']}" if result['status'] != 'ok' else ''))
    results = {c.name: r for c in cells if (r := runner.read_result(workdir, c)) is not None}
    print(report.write(workdir, sweep.axes, cells, results, f.metric), flush=True)


if __name__ == '__main__':
  cli.define_flags()
  app.run(main, flags_parser=cli.parse_flags)
