"""The server's Prometheus series (`GET /metrics`), in a registry of its own per server."""
import prometheus_client as prom

# Seconds: from a millisecond step on a small model to a minute-long queue.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
  """Requests by endpoint and status, queue depth, running batch size, tokens in and out, and
  time-to-first-token, inter-token and whole-request latencies."""

  def __init__(self, engine):
    self.registry = prom.CollectorRegistry()
    kw = dict(registry=self.registry, namespace='lepton')
    self.requests = prom.Counter('requests', 'HTTP requests answered, by endpoint and status.',
                                 ['endpoint', 'status'], **kw)
    prom.Gauge('queue_depth', 'Requests waiting for a decode slot.',
               **kw).set_function(lambda: engine.queue_depth)
    prom.Gauge('running_batch_size', 'Decode slots in use.',
               **kw).set_function(lambda: engine.running)
    prom.Gauge('max_batch_size', 'Decode slots.', **kw).set(engine.max_batch)
    self.prompt_tokens = prom.Counter('prompt_tokens', 'Prompt tokens prefilled.', **kw)
    self.generation_tokens = prom.Counter('generation_tokens', 'Tokens generated.', **kw)
    self.time_to_first_token = prom.Histogram(
        'time_to_first_token_seconds', 'From a request arriving to its first new token.',
        buckets=LATENCY_BUCKETS, **kw)
    self.inter_token_latency = prom.Histogram(
        'inter_token_latency_seconds', 'Between two new tokens of a request.',
        buckets=LATENCY_BUCKETS, **kw)
    self.request_latency = prom.Histogram(
        'request_latency_seconds', 'From a request arriving to its last token.',
        buckets=LATENCY_BUCKETS, **kw)

  def exposition(self) -> tuple[bytes, str]:
    """(the text format, its content type)."""
    return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
