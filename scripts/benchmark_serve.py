"""Serving speed in the manner of vLLM's `bench serve`: request throughput, output tokens/s, and
TTFT, TPOT and ITL at p50/p90/p99, under Poisson arrivals at several rates and at fixed
concurrencies.

  python scripts/benchmark_serve.py --config=configs/stdlib_tiny.py --config.model.vocab_size=8192 \
      [--max_batch=16] [--concurrency=1,16] [--rates=2,8,32] [--num_requests=64] \
      [--prompt_len=32:256] [--output_len=64:128] [--plot=docs/serve_throughput.png]
  python scripts/benchmark_serve.py --url=http://127.0.0.1:8000 --model=NAME ...  # any server

With --config, a model of that config with random weights is served by lepton-serve's engine and
HTTP layer in a child process (byte tokenizer: prompts are random token ids, sent as ids) and the
clients run here, so both share the machine. Prompt and output lengths are uniform over the given
ranges (a fixed seed); each request streams with `logprobs: 0`, so every token arrives in its own
chunk. TTFT: from sending to the first token; TPOT: (last - first token) / (tokens - 1) per
request; ITL: every gap between tokens. One JSON line per setting, then a markdown table.
"""
import asyncio
import json
import multiprocessing
import socket
import time

from absl import flags
import numpy as np

from lepton_jax import cli

cli.define_flags()
flags.DEFINE_string('url', None, 'Benchmark this server instead of serving --config here.')
flags.DEFINE_string('model', None, 'Model id to ask --url for (default: its first).')
flags.DEFINE_integer('max_batch', 16, 'Decode slots of the server started for --config.')
flags.DEFINE_list('concurrency', ['1', '16'], 'Fixed numbers of clients, each sending its next '
                  'request when its last is answered.')
flags.DEFINE_list('rates', [], 'Poisson arrival rates (requests/s) to run, besides concurrency.')
flags.DEFINE_integer('num_requests', 64, 'Requests per setting.', lower_bound=1)
flags.DEFINE_string('prompt_len', '32:256', 'Prompt tokens, uniform in LO:HI.')
flags.DEFINE_string('output_len', '64:128', 'max_tokens, uniform in LO:HI.')
flags.DEFINE_integer('seed', 0, 'Seed of the lengths, tokens and arrival times.')
flags.DEFINE_string('plot', None, 'Write output tokens/s against TPOT and TTFT to this PNG.')
FLAGS = flags.FLAGS


def serve_random_model(config, port: int, max_batch: int) -> None:
  """The child process: lepton-serve's engine and HTTP layer over random weights."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lepton_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from lepton_jax.model import ModelConfig, Transformer  # pylint: disable=g-import-not-at-top
  from lepton_jax.serve import server  # pylint: disable=g-import-not-at-top
  model = Transformer(ModelConfig.from_config(config.model))
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  served = server.build(model, variables, tokenizers.ByteTokenizer(), 'random',
                        max_batch=max_batch, max_queue=4096)
  server.serve(served, '127.0.0.1', port, drain_s=5)


def lengths(spec: str) -> tuple[int, int]:
  low, _, high = spec.partition(':')
  return int(low), int(high or low)


async def one_request(session, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
  body = {'model': model, 'prompt': prompt, 'max_tokens': max_tokens, 'temperature': 0,
          'stream': True, 'logprobs': 0}
  start = time.perf_counter()
  times = []
  async with session.post(url + '/v1/completions', json=body) as response:
    response.raise_for_status()
    async for line in response.content:
      line = line.strip()
      if not line.startswith(b'data: ') or line == b'data: [DONE]':
        continue
      chunk = json.loads(line[6:])
      now = time.perf_counter()
      for choice in chunk['choices']:
        times += [now] * len((choice.get('logprobs') or {}).get('tokens') or [])
  return {'start': start, 'times': times, 'end': time.perf_counter()}


def make_requests(num: int, vocab: int, rng) -> list[tuple[list[int], int]]:
  (p_lo, p_hi), (o_lo, o_hi) = lengths(FLAGS.prompt_len), lengths(FLAGS.output_len)
  return [(rng.integers(0, vocab, rng.integers(p_lo, p_hi + 1)).tolist(),
           int(rng.integers(o_lo, o_hi + 1))) for _ in range(num)]


async def run_setting(url: str, model: str, requests: list, concurrency: int | None,
                      rate: float | None, rng) -> list[dict]:
  import aiohttp  # pylint: disable=g-import-not-at-top
  timeout = aiohttp.ClientTimeout(total=3600)
  async with aiohttp.ClientSession(timeout=timeout,
                                   connector=aiohttp.TCPConnector(limit=0)) as session:
    if concurrency:
      pending = list(requests)

      async def worker():
        done = []
        while pending:
          done.append(await one_request(session, url, model, *pending.pop(0)))
        return done

      return [r for rs in await asyncio.gather(*(worker() for _ in range(concurrency)))
              for r in rs]
    tasks = []
    for prompt, max_tokens in requests:
      tasks.append(asyncio.ensure_future(one_request(session, url, model, prompt, max_tokens)))
      await asyncio.sleep(rng.exponential(1.0 / rate))
    return await asyncio.gather(*tasks)


def summarize(results: list[dict]) -> dict:
  ms = lambda xs: {f'p{q}': round(float(np.percentile(xs, q)) * 1e3, 2) for q in (50, 90, 99)}
  ttft = [r['times'][0] - r['start'] for r in results if r['times']]
  tpot = [(r['times'][-1] - r['times'][0]) / (len(r['times']) - 1)
          for r in results if len(r['times']) > 1]
  itl = [b - a for r in results for a, b in zip(r['times'], r['times'][1:])]
  span = max(r['end'] for r in results) - min(r['start'] for r in results)
  tokens = sum(len(r['times']) for r in results)
  return {'requests': len(results), 'duration_s': round(span, 2),
          'request_throughput': round(len(results) / span, 3),
          'output_tokens_per_s': round(tokens / span, 1),
          'ttft_ms': ms(ttft), 'tpot_ms': ms(tpot), 'itl_ms': ms(itl)}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def wait_for(url: str, child=None) -> None:
  import urllib.request  # pylint: disable=g-import-not-at-top
  deadline = time.monotonic() + 600
  while time.monotonic() < deadline:
    if child is not None and not child.is_alive():
      raise RuntimeError(f'the server process exited with {child.exitcode}')
    try:
      with urllib.request.urlopen(url + '/health', timeout=2):
        return
    except OSError:
      time.sleep(0.5)
  raise TimeoutError(f'{url} did not answer /health')


def plot(rows: list[tuple[str, dict]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, title in ((axes[0], 'tpot_ms', 'TPOT (ms per output token)'),
                         (axes[1], 'ttft_ms', 'TTFT (ms)')):
    for quantile, marker in (('p50', 'o'), ('p99', 's')):
      xs = [s['output_tokens_per_s'] for _, s in rows]
      ys = [s[key][quantile] for _, s in rows]
      ax.plot(xs, ys, marker=marker, linestyle='-', label=quantile)
      for (label, _), x, y in zip(rows, xs, ys):
        ax.annotate(label, (x, y), fontsize=7, textcoords='offset points', xytext=(3, 3))
    ax.set_xlabel('output tokens/s')
    ax.set_ylabel(title)
    ax.set_yscale('log')
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  child = None
  if FLAGS.url:
    url = FLAGS.url.rstrip('/')
    wait_for(url)
    import urllib.request  # pylint: disable=g-import-not-at-top
    with urllib.request.urlopen(url + '/v1/models') as response:
      listed = json.loads(response.read())['data'][0]
    model, vocab = FLAGS.model or listed['id'], 256
  else:
    if FLAGS.config is None:
      raise SystemExit('give --config (a model to serve here) or --url')
    port = free_port()
    url, model, vocab = f'http://127.0.0.1:{port}', 'random', FLAGS.config.model.vocab_size
    child = multiprocessing.get_context('spawn').Process(
        target=serve_random_model, args=(FLAGS.config, port, FLAGS.max_batch), daemon=True)
    child.start()
    wait_for(url, child)
  try:
    rng = np.random.default_rng(FLAGS.seed)
    settings = [(f'c={c}', int(c), None) for c in FLAGS.concurrency]
    settings += [(f'rate={r}', None, float(r)) for r in FLAGS.rates]
    # Warm-up: the server compiled at start; this warms the client and the connections.
    asyncio.run(run_setting(url, model, make_requests(4, vocab, rng), 4, None, rng))
    rows = []
    for label, concurrency, rate in settings:
      requests = make_requests(FLAGS.num_requests, vocab, np.random.default_rng(FLAGS.seed))
      summary = summarize(asyncio.run(run_setting(url, model, requests, concurrency, rate, rng)))
      rows.append((label, summary))
      print(json.dumps({'setting': label, **summary}), flush=True)
    print('\n| setting | req/s | output tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | '
          'ITL p50/p90/p99 ms |\n|---|---|---|---|---|---|')
    q = lambda d: ' / '.join(str(d[k]) for k in ('p50', 'p90', 'p99'))
    for label, s in rows:
      print(f"| {label} | {s['request_throughput']} | {s['output_tokens_per_s']} | "
            f"{q(s['ttft_ms'])} | {q(s['tpot_ms'])} | {q(s['itl_ms'])} |")
    if FLAGS.plot:
      plot(rows, FLAGS.plot)
    base = dict(rows).get('c=1')
    if base:
      for label, s in rows:
        print(f"{label}: {s['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x one "
              f"client's output tokens/s; TPOT p99 {s['tpot_ms']['p99'] / base['tpot_ms']['p50']:.2f}x "
              "one client's TPOT p50", flush=True)
  finally:
    if child is not None:
      child.terminate()
      child.join(30)


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=cli.parse_flags)
