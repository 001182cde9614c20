"""A run you can see into: profiler windows, memory and data-wait figures, per-event times, loss
spikes, goodput and the hang watchdog.

The training loop brackets each iteration with `step_begins` / `step_ends`, wraps its data fetch
in `data_wait`, its evaluations and checkpoint saves in `timed`, tells `step_finished` each step's metrics once the
host has them, and passes its logged scalars through `write`, which adds these figures:

  memory/host_rss_bytes, memory/host_peak_rss_bytes   this process, on every backend
  memory/device_bytes_in_use, .../device_peak_bytes_in_use   the fullest local device, where the
      backend reports memory_stats() (GPU, TPU; not CPU)
  perf/step_seconds, perf/data_wait_fraction   host time per step since the last record (less
      evaluation and checkpointing) and its share spent fetching the batch; in multi-process
      runs also .../process_I for every process (a straggler stands out)
  time/compile_seconds, time/eval_seconds, time/checkpoint_save_seconds,
  time/checkpoint_restore_seconds   per event, in the record of the step it happened at

WORKDIR/timeline.jsonl (process 0) keeps what goodput is computed from, across restarts:
segment starts and ends, step spans, evaluations, checkpoint saves and restores, loss spikes and
hangs. The cheap parts are always on; the profiler, the watchdog thread and the per-step data
positions exist only when config.profile, config.hang_timeout_s and config.loss_spike ask.
"""
import collections
import contextlib
import faulthandler
import json
import os
import resource
import sys
import tempfile
import threading
import time
from typing import Any, Iterator, Mapping

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import psutil

from lepton_jax import metrics

# os.EX_TEMPFAIL: a temporary failure, so a scheduler runs the same command again (it resumes).
HANG_EXIT_CODE = 75
# JAX's own timings of tracing, lowering and XLA compilation (jax._src.dispatch).
COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                  '/jax/core/compile/jaxpr_to_mlir_module_duration',
                  '/jax/core/compile/backend_compile_duration')
BADPUT_EVENTS = {'checkpoint_save': 'unproductive_checkpoint_save_time',
                 'checkpoint_restore': 'unproductive_checkpoint_restore_time', 'eval': 'eval'}


class Monitor:
  """One segment of a run (one process lifetime) as the training loop reports it."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, active: bool):
    """Starts the segment's clock; nothing is written until `start`. `active`: process 0."""
    self._config, self._workdir, self._active = config, workdir, active
    self._started = time.time()
    self._records: list[dict] = []  # Timeline records before `start` opens the file.
    self._timeline: metrics.JsonLines | None = None
    self._lock = threading.Lock()  # The watchdog thread appends to the timeline too.
    self._step = 0  # The step the loop is on (or last finished, between iterations).
    self._first_step = None
    self._event_seconds = collections.defaultdict(float)  # time/* figures for the next record.
    self._staged: list[tuple[int, dict]] = []  # Records the running iteration logged.
    self._iteration = None  # [start time, badput seconds so far] of the iteration running.
    self._window = _Window()
    self._span: dict | None = None
    self._data_seconds = 0.0
    self._positions = collections.deque(maxlen=4)  # (step, data position before its batch).
    self._data_iterator = None
    self._profile = self._watchdog = self._spikes = self._annotation = None
    self._writer = None
    self._closing = False

  def start(self, first_step: int, writer: metrics.MetricWriter, data_iterator) -> None:
    """Called just before the first step: opens the timeline, arms what the config asks for."""
    self._first_step = self._step = first_step
    self._writer, self._data_iterator = writer, data_iterator
    if self._active:
      self._timeline = metrics.JsonLines(os.path.join(self._workdir, 'timeline.jsonl'),
                                         first_step=None)
    self._append({'event': 'start', 'step': first_step, 'time': self._started,
                  'processes': jax.process_count()})
    for record in self._records:
      self._append(record)
    self._records = []
    jax.monitoring.register_event_duration_secs_listener(self._on_jax_duration)
    if self._config.profile.num_steps:
      self._profile = ProfileWindow(self._config.profile, self._workdir, first_step)
    if self._config.hang_timeout_s:
      self._watchdog = Watchdog(self._config.hang_timeout_s, self._on_hang)
    if self._config.loss_spike.window:
      self._spikes = SpikeDetector(self._config.loss_spike.window,
                                   self._config.loss_spike.threshold)

  def step_begins(self, step: int, state: Any) -> None:
    """The loop iteration that runs `step` starts from `state`."""
    self._step = step
    if self._profile:
      self._profile.before_step(step, state)
      if self._profile.active:
        self._annotation = jax.profiler.StepTraceAnnotation('train', step_num=step)
        self._annotation.__enter__()
    if self._spikes:  # Where the batch comes from, to replay a spike.
      self._positions.append((step, self._data_iterator.get_state()))
    self._iteration = [time.perf_counter(), 0.0]
    self._data_seconds = 0.0

  def step_ends(self) -> None:
    """The iteration is done: its time is counted and its record written."""
    if self._annotation:
      self._annotation.__exit__(None, None, None)
      self._annotation = None
    start, badput = self._iteration
    self._iteration = None
    wall = time.perf_counter() - start
    if self._step == self._first_step + 1:  # Compiles: goodput weighs it against the others.
      self._append({'event': 'first_step', 'step': self._step, 'seconds': wall - badput,
                    'start': time.time() - wall})
    else:
      self._window.add(wall - badput, self._data_seconds)
      if self._span is None:
        self._span = {'event': 'steps', 'first': self._step, 'seconds': 0.0}
      self._span['step'] = self._step
      self._span['seconds'] += wall - badput
    # Spans end where a restart may resume (a checkpoint) and at each record, so a crash
    # loses at most the steps since the last record from the timeline.
    if badput or self._staged:
      self._close_span()
    self._flush()

  @contextlib.contextmanager
  def data_wait(self) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self._data_seconds += time.perf_counter() - start

  @contextlib.contextmanager
  def timed(self, event: str) -> Iterator[None]:
    """An evaluation, a checkpoint save or restore: logged, and not counted as step time."""
    start = time.perf_counter()
    try:
      yield
    finally:
      seconds = time.perf_counter() - start
      self._event_seconds[f'time/{event}_seconds'] += seconds
      if self._iteration is not None:
        self._iteration[1] += seconds
      record = {'event': event, 'step': self._step, 'seconds': seconds}
      if self._first_step is None:
        self._records.append(record)
      else:
        self._append(record)

  def step_finished(self, step: int, step_metrics: Mapping[str, float]) -> None:
    """The host has step `step`'s metrics: it really finished (the watchdog's heartbeat)."""
    if self._watchdog:
      self._watchdog.beat(step)
    if not self._spikes:
      return
    loss = step_metrics['train/loss']
    z_score = self._spikes.z_score(loss)
    if z_score is None or z_score < self._spikes.threshold:
      return
    position = next((p for s, p in self._positions if s == step), None)
    spike = {'event': 'loss_spike', 'step': step, 'loss': loss, 'z_score': round(z_score, 2),
             'grad_norm': step_metrics['train/grad_norm'], 'data_position': position}
    logging.warning('Loss spike at step %d: loss %.4f, robust z-score %.1f over the last %d '
                    'steps, gradient norm %.4g; its batch is at data position %s',
                    step, loss, z_score, self._spikes.window, spike['grad_norm'],
                    json.dumps(position))
    self._append(spike)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Step `step`'s logged scalars; written with memory, step-time and event figures when the
    iteration ends, so a checkpoint saved at that step lands in its record too."""
    self._staged.append((step, scalars))

  def close(self) -> None:
    """Ends the segment: the last record, the profile, the watchdog; prints and saves goodput."""
    if self._first_step is None:
      return
    jax.monitoring.unregister_event_duration_listener(self._on_jax_duration)
    if self._watchdog:
      self._watchdog.close()
    self._closing = True  # After an exception, other processes may not come to a gather.
    if self._annotation:
      self._annotation.__exit__(None, None, None)
    # An iteration an exception cut short finished no step: its time stays out of the spans.
    self._iteration = None
    if self._profile:
      self._profile.close()
    self._flush()
    self._close_span()
    self._append({'event': 'end', 'step': self._step, 'time': time.time()})
    if self._active:
      report_goodput(self._timeline.read(), self._workdir)

  def _on_jax_duration(self, event: str, seconds: float, **kwargs) -> None:
    del kwargs
    if event in COMPILE_EVENTS:
      self._event_seconds['time/compile_seconds'] += seconds

  def _close_span(self) -> None:
    if self._span:
      self._append({**self._span, 'time': time.time()})
      self._span = None

  def _flush(self) -> None:
    """Writes the staged records. Their step-time figures cover the iterations since the last
    flush (the segment's first excepted: it compiles); in multi-process runs, which reach each
    flush at the same steps, every process's too."""
    if not self._staged:
      return
    figures = memory_figures()
    step_seconds, data_fraction = self._window.take()
    if step_seconds is not None:
      figures['perf/step_seconds'] = step_seconds
      figures['perf/data_wait_fraction'] = data_fraction
    if jax.process_count() > 1 and not self._closing:
      mine = np.asarray([np.nan if step_seconds is None else step_seconds,
                         np.nan if data_fraction is None else data_fraction], np.float64)
      every = np.asarray(multihost_utils.process_allgather(mine))
      for i, (seconds, fraction) in enumerate(every):
        if np.isfinite(seconds):
          figures[f'perf/step_seconds/process_{i}'] = float(seconds)
          figures[f'perf/data_wait_fraction/process_{i}'] = float(fraction)
    *earlier, (last_step, last_scalars) = self._staged
    for step, scalars in earlier:
      self._writer.write(step, {**scalars, **figures})
    # This iteration's events (an eval, a save) belong to the latest step it logged.
    self._writer.write(last_step, {**last_scalars, **figures, **self._event_seconds})
    self._event_seconds.clear()
    self._staged = []

  def _append(self, record: dict) -> None:
    if self._timeline is not None:
      with self._lock:
        self._timeline.append({**record, 'time': record.get('time', time.time())})

  def _on_hang(self, step: int, idle_seconds: float) -> None:
    """On the watchdog's thread: every thread's stack to the log and the workdir."""
    stacks = thread_stacks()
    process = jax.process_index()
    path = epath.Path(self._workdir) / 'hangs' / f'process_{process}_after_step_{step}.txt'
    logging.error('No step has finished for %.0f s (config.hang_timeout_s=%g), the last was step '
                  '%d; the stack of every thread (also in %s):\n%s', idle_seconds,
                  self._config.hang_timeout_s, step, path, stacks)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(stacks)
    self._append({'event': 'hang', 'step': step, 'seconds': idle_seconds, 'time': time.time()})
    if self._config.hang_exit:
      logging.error('Exiting with status %d (config.hang_exit): run the same command again to '
                    'resume from the latest checkpoint.', HANG_EXIT_CODE)
      logging.flush()
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(HANG_EXIT_CODE)  # pylint: disable=protected-access  (the main thread is stuck)


class _Window:
  """Host seconds per step, and the share spent fetching data, since the last `take`."""

  def __init__(self):
    self._steps, self._seconds, self._data = 0, 0.0, 0.0

  def add(self, seconds: float, data_seconds: float) -> None:
    self._steps, self._seconds, self._data = (self._steps + 1, self._seconds + seconds,
                                              self._data + data_seconds)

  def take(self) -> tuple[float | None, float | None]:
    if not self._steps:
      return None, None
    figures = self._seconds / self._steps, self._data / max(self._seconds, 1e-12)
    self.__init__()
    return figures


def memory_figures() -> dict[str, float]:
  """Host RSS now and at its peak; device bytes in use and peak where the backend has them."""
  rss = psutil.Process().memory_info().rss
  # ru_maxrss is in KiB on Linux, in bytes on macOS; the kernel updates it lazily.
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
      1 if sys.platform == 'darwin' else 1024)
  figures = {'memory/host_rss_bytes': float(rss),
             'memory/host_peak_rss_bytes': float(max(rss, peak_rss))}
  stats = [device.memory_stats() for device in jax.local_devices()]
  if all(stats):
    figures['memory/device_bytes_in_use'] = float(max(s.get('bytes_in_use', 0) for s in stats))
    figures['memory/device_peak_bytes_in_use'] = float(
        max(s.get('peak_bytes_in_use', 0) for s in stats))
  return figures


class ProfileWindow:
  """A jax.profiler trace of steps [start_step, start_step + num_steps) (config.profile).

  A segment's first step compiles, so it is never in the window. The device work is waited for
  at both edges, so the trace holds exactly those steps, each a StepTraceAnnotation.
  """

  def __init__(self, profile: ml_collections.ConfigDict, workdir: str, first_step: int):
    self.first = max(profile.start_step, first_step + 2)
    self.end = profile.start_step + profile.num_steps
    self.active = False
    self._dir = profile.dir or os.path.join(workdir, 'profile')
    if jax.process_count() > 1:  # Processes on one host would write the same <host> files.
      self._dir = os.path.join(self._dir, f'process_{jax.process_index()}')
    if not (profile.all_processes or jax.process_index() == 0) or self.first >= self.end:
      self.first = self.end = -1

  def before_step(self, step: int, state: Any) -> None:
    if step == self.first:
      jax.block_until_ready(state)
      jax.profiler.start_trace(self._dir, create_perfetto_trace=True)
      self.active = True
    elif step == self.end and self.active:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info('Profiled steps %d to %d into %s (tensorboard --logdir %s, or Perfetto on its '
                   'perfetto_trace.json.gz)', self.first, self.end - 1, self._dir, self._dir)


class SpikeDetector:
  """Robust z-score of a loss against the `window` finite losses before it:
  (loss - median) / (1.4826 * MAD), 1.4826 making the MAD a standard deviation for normal data."""

  def __init__(self, window: int, threshold: float):
    self.window, self.threshold = window, threshold
    self._losses = collections.deque(maxlen=window)

  def z_score(self, loss: float) -> float | None:
    """None until the window is full, and for a window with no spread."""
    z_score = None
    if len(self._losses) == self.window:
      past = np.asarray(self._losses)
      median = np.median(past)
      mad = np.median(np.abs(past - median))
      if mad > 0:
        z_score = float((loss - median) / (1.4826 * mad))
    if np.isfinite(loss):
      self._losses.append(loss)
    return z_score


class Watchdog:
  """Calls `on_hang(step, idle_seconds)` once per stall when no `beat` came for `timeout_s`.

  Armed by the first beat: the first step's compilation is not timed.
  """

  def __init__(self, timeout_s: float, on_hang):
    self._timeout, self._on_hang = timeout_s, on_hang
    self._last = None  # (monotonic time, step) of the last beat.
    self._fired = False
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, name='lepton-hang-watchdog', daemon=True)
    self._thread.start()

  def beat(self, step: int) -> None:
    self._last, self._fired = (time.monotonic(), step), False

  def close(self) -> None:
    self._stop.set()
    self._thread.join()

  def _watch(self) -> None:
    while not self._stop.wait(min(1.0, self._timeout / 4)):
      last = self._last
      if last is None or self._fired:
        continue
      idle = time.monotonic() - last[0]
      if idle >= self._timeout:
        self._fired = True
        self._on_hang(last[1], idle)


def thread_stacks() -> str:
  """Every thread's Python stack, as faulthandler writes it (it needs a real file)."""
  with tempfile.TemporaryFile('w+') as f:
    faulthandler.dump_traceback(f, all_threads=True)
    f.seek(0)
    return f.read()


def goodput(timeline: list[dict]) -> dict:
  """Goodput and badput of the run `timeline` records, as ml-goodput-measurement defines them.

  Total time runs from the first segment's start to the last record. Productive time is the
  time of the training steps whose progress is kept: each step's wall time (from one iteration's
  start to the next) less the evaluations and blocking checkpoint saves inside it. A segment's
  first step also compiles: what it took beyond the segment's average step is program start-up.
  Steps after the checkpoint a later segment resumes from are progress lost to the disruption,
  and the time from a segment's last record to the next one's start is recovery from it. What
  no bucket holds is `other`. (ml-goodput's accelerator initialization is inside training_prep
  here: everything from train_and_evaluate's start to the first step, restores excepted.)
  """
  badput = collections.defaultdict(float)
  kept = []  # Productive step spans: [first, last, seconds].
  last_time = first_time = None
  segments = disruptions = 0
  for segment in _segments(timeline):
    start = segment[0]
    segments += 1
    if first_time is None:
      first_time = start['time']
    else:
      disruptions += 1
      badput['infrastructure_recovery_from_disruption'] += max(0.0, start['time'] - last_time)
      badput['wasted_progress_from_disruption'] += _trim(kept, start['step'])
    spans = [r for r in segment if r['event'] == 'steps']
    steps = sum(r['step'] - r['first'] + 1 for r in spans)
    average = sum(r['seconds'] for r in spans) / steps if steps else 0.0
    restores = sum(r['seconds'] for r in segment if r['event'] == 'checkpoint_restore')
    for record in segment:
      event = record['event']
      if event in BADPUT_EVENTS:
        badput[BADPUT_EVENTS[event]] += record['seconds']
      elif event == 'steps':
        kept.append([record['first'], record['step'], record['seconds']])
      elif event == 'first_step':
        startup = max(0.0, record['seconds'] - average) if steps else 0.0
        badput['program_startup'] += startup
        badput['training_prep'] += max(0.0, record['start'] - start['time'] - restores)
        kept.append([record['step'], record['step'], record['seconds'] - startup])
    last_time = max(r['time'] for r in segment)
  total = (last_time - first_time) if segments else 0.0
  productive = sum(seconds for _, _, seconds in kept)
  badput['other'] = max(0.0, total - productive - sum(badput.values()))
  share = lambda seconds: round(100 * seconds / total, 2) if total > 0 else 0.0
  return {'goodput_percent': share(productive), 'total_seconds': round(total, 3),
          'productive_seconds': round(productive, 3),
          'badput_seconds': {k: round(v, 3) for k, v in sorted(badput.items())},
          'badput_percent': {k: share(v) for k, v in sorted(badput.items())},
          'segments': segments, 'disruptions': disruptions,
          'last_productive_step': max((last for _, last, _ in kept), default=0)}


def _segments(timeline: list[dict]) -> list[list[dict]]:
  segments = []
  for record in timeline:
    if record['event'] == 'start':
      segments.append([])
    if segments:
      segments[-1].append(record)
  return segments


def _trim(kept: list[list], resumed_step: int) -> float:
  """Drops the progress after `resumed_step` from the kept spans; returns its seconds."""
  lost = 0.0
  for span in kept:
    first, last, seconds = span
    if last > resumed_step:
      lost_part = seconds * (last - max(first - 1, resumed_step)) / (last - first + 1)
      lost += lost_part
      span[1], span[2] = resumed_step, seconds - lost_part
  kept[:] = [span for span in kept if span[1] >= span[0]]
  return lost


def report_goodput(timeline: list[dict], workdir: str) -> dict:
  """Prints the run's and its last segment's goodput; writes both to WORKDIR/goodput.json."""
  last_start = max(i for i, r in enumerate(timeline) if r['event'] == 'start')
  result = {'run': goodput(timeline), 'segment': goodput(timeline[last_start:])}
  epath.Path(workdir, 'goodput.json').write_text(json.dumps(result, indent=2) + '\n')
  run, segment = result['run'], result['segment']
  largest = sorted(run['badput_percent'].items(), key=lambda kv: -kv[1])
  print(f"Goodput {run['goodput_percent']:.1f}% of {run['total_seconds']:.1f} s over "
        f"{run['segments']} segment(s) (this segment {segment['goodput_percent']:.1f}% of "
        f"{segment['total_seconds']:.1f} s); badput: "
        + ', '.join(f'{k} {v:.1f}%' for k, v in largest if v) + f' ({workdir}/goodput.json)',
        flush=True)
  return result
