"""A sweep's results as WORKDIR/results.jsonl, table.md and three plots (matplotlib).

table.md has a row per cell: its labels, the metric's mean +- standard deviation over the seeds
that finished, its difference to the cell with each axis's first label instead (the baseline;
with seeds, the difference of the means), parameters, the last checkpoint's trainable
parameters, optimizer-state and checkpoint bytes, and median training tokens/s. Runs that
failed are counted in the row and listed below the table with their error; cells not run yet
(another --shard's) are marked pending. curves.png draws each cell's validation curve (the mean
over its seeds); final.png each cell's final metric with the seeds' standard deviation against
the first axis's labels, a line per label of the others; budget.png the same against trainable
parameters (log scale), what adapter studies compare.
"""
import io
import json
import statistics

from etils import epath
import numpy as np

from lepton_jax import paths
from lepton_jax.ablation import grid


def _mean_std(values: list[float]) -> tuple[float, float | None]:
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(cells: list[grid.Cell], results: dict[str, dict], metric: str) -> list[dict]:
  """One row per cell group, in grid order: labels, values over seeds, runs ok/failed/pending."""
  rows = {}
  for cell in cells:
    row = rows.setdefault(cell.group, {'labels': dict(cell.labels), 'values': [], 'ok': 0,
                                       'failed': 0, 'pending': 0, 'params': None,
                                       'footprint': {}, 'speeds': []})
    result = results.get(cell.name)
    if result is None:
      row['pending'] += 1
      continue
    row['params'] = row['params'] or result.get('params')
    if result['status'] != 'ok':
      row['failed'] += 1
      continue
    row['ok'] += 1
    row['footprint'] = row['footprint'] or result.get('footprint', {})
    if metric in result['final']:
      row['values'].append(result['final'][metric])
    if result.get('tokens_per_sec'):
      row['speeds'].append(result['tokens_per_sec'])
  return list(rows.values())


def _megabytes(count: int) -> str:
  return f'{count / 1e6:.2f} MB'


def _baseline(row: dict, axis: str, first: str, rows: list[dict]) -> dict | None:
  wanted = dict(row['labels'], **{axis: first})
  return next((r for r in rows if r['labels'] == wanted), None)


def table(axes: grid.Axes, rows: list[dict], results: dict[str, dict], metric: str) -> str:
  axis_names = list(axes)
  firsts = {axis: next(iter(labels)) for axis, labels in axes.items()}
  header = [*axis_names, metric, *(f'Δ vs {axis}={firsts[axis]}' for axis in axis_names),
            'params', 'trainable', 'optimizer state', 'checkpoint', 'tokens/s', 'runs']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in rows:
    mean, std = _mean_std(row['values']) if row['values'] else (None, None)
    value = '—' if mean is None else f'{mean:.4f}' + (f' ± {std:.4f}' if std is not None else '')
    deltas = []
    for axis in axis_names:
      base = _baseline(row, axis, firsts[axis], rows)
      if row['labels'][axis] == firsts[axis]:
        deltas.append('(baseline)')
      elif mean is None or base is None or not base['values']:
        deltas.append('—')
      else:
        deltas.append(f'{mean - statistics.mean(base["values"]):+.4f}')
    runs = f"{row['ok']} ok" + ''.join(f", {row[k]} {k}" for k in ('failed', 'pending') if row[k])
    speed = f"{statistics.median(row['speeds']):,.0f}" if row['speeds'] else '—'
    params = f"{row['params']:,}" if row['params'] else '—'
    measured = row['footprint']
    trainable = f"{measured['trainable']:,}" if measured else '—'
    sizes = [_megabytes(measured[k]) if measured else '—'
             for k in ('optimizer_bytes', 'checkpoint_bytes')]
    lines.append('| ' + ' | '.join([*(row['labels'][a] for a in axis_names), value, *deltas,
                                    params, trainable, *sizes, speed, runs]) + ' |')
  failures = [r for r in results.values() if r['status'] != 'ok']
  if failures:
    lines += ['', 'Failed runs:', '']
    lines += [f"- `{r['name']}`: {r.get('error', '')}" for r in failures]
  return '\n'.join(lines) + '\n'


def _save(figure, path: epath.Path) -> None:
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=120, bbox_inches='tight')
  paths.write_atomically(path, buffer.getvalue())


def plot_curves(cells: list[grid.Cell], results: dict[str, dict], metric: str,
                path: epath.Path) -> None:
  """Each cell's `metric` against step, averaged over the seeds that logged each step."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, ax = plt.subplots(figsize=(7, 4.5))
  groups = {}
  for cell in cells:
    curve = results.get(cell.name, {}).get('curves', {}).get(metric)
    if curve:
      groups.setdefault(cell.group or 'baseline', []).append(dict(curve))
  for group, curves in groups.items():
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    ax.plot(steps, [np.mean([c[s] for c in curves]) for s in steps], marker='.', label=group)
  ax.set_xlabel('step')
  ax.set_ylabel(metric)
  ax.legend(fontsize='small')
  ax.grid(alpha=0.3)
  _save(figure, path)
  plt.close(figure)


def final_series(axes: grid.Axes, rows: list[dict]) -> dict[str, list[tuple]]:
  """The final-metric points to plot: x is the index of a cell's label on the first axis, and a
  series per combination of the other axes' labels ('' with one axis), each point
  (x, mean, std over seeds), in x order."""
  first = next(iter(axes))
  series = {}
  for row in rows:
    if row['values']:
      rest = ','.join(label for axis, label in row['labels'].items() if axis != first)
      x = list(axes[first]).index(row['labels'][first])
      series.setdefault(rest, []).append((x, *_mean_std(row['values'])))
  return {name: sorted(points) for name, points in series.items()}


def plot_final(axes: grid.Axes, rows: list[dict], metric: str, path: epath.Path) -> None:
  """Each cell's final `metric` (mean over seeds, their standard deviation) against the first
  axis's labels; with more axes, a line per combination of the others (loss against learning
  rate, with and without a stabilizer)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  first = next(iter(axes))
  series = final_series(axes, rows)
  figure, ax = plt.subplots(figsize=(max(4, 0.9 * len(axes[first]) + 2), 4.5))
  for name, points in series.items():
    xs, means, stds = zip(*points)
    ax.errorbar(xs, means, yerr=[s or 0 for s in stds], fmt='o-' if name else 'o', capsize=4,
                label=name or None)
  ax.set_xticks(range(len(axes[first])), list(axes[first]), rotation=30, ha='right')
  ax.set_xlabel(first)
  ax.set_ylabel(f'final {metric}')
  if any(series):
    ax.legend(fontsize='small')
  ax.grid(alpha=0.3)
  _save(figure, path)
  plt.close(figure)


def plot_budget(rows: list[dict], metric: str, path: epath.Path) -> None:
  """Each cell's final `metric` (mean and seeds' std) against its trainable parameters."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  measured = [r for r in rows if r['values'] and r['footprint']]
  figure, ax = plt.subplots(figsize=(7, 4.5))
  for row in measured:
    mean, std = _mean_std(row['values'])
    ax.errorbar(row['footprint']['trainable'], mean, yerr=std or 0, fmt='o', capsize=4)
    ax.annotate(','.join(row['labels'].values()) or 'baseline',
                (row['footprint']['trainable'], mean), fontsize=7, xytext=(4, 3),
                textcoords='offset points')
  ax.set_xscale('log')
  ax.set_xlabel('trainable parameters')
  ax.set_ylabel(f'final {metric}')
  ax.grid(alpha=0.3)
  _save(figure, path)
  plt.close(figure)


def write(workdir: epath.Path, axes: grid.Axes, cells: list[grid.Cell],
          results: dict[str, dict], metric: str) -> str:
  """Writes results.jsonl, table.md, curves.png, final.png and budget.png; returns the table."""
  lines = [json.dumps(results[c.name]) for c in cells if c.name in results]
  paths.write_atomically(workdir / 'results.jsonl', ''.join(l + '\n' for l in lines).encode())
  rows = summarize(cells, results, metric)
  markdown = table(axes, rows, results, metric)
  paths.write_atomically(workdir / 'table.md', markdown.encode())
  plot_curves(cells, results, metric, workdir / 'curves.png')
  plot_final(axes, rows, metric, workdir / 'final.png')
  plot_budget(rows, metric, workdir / 'budget.png')
  return markdown
