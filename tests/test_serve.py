"""lepton-serve over HTTP on 127.0.0.1, with the official `openai` client: a tiny trained lepton
run's completions, streaming, stop strings, echo log-probs, chat, errors in OpenAI's shape, the
tokenizer endpoints, metrics, the API key, body limits and disconnects."""
import contextlib
import dataclasses
import json
import socket
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

openai = pytest.importorskip('openai')
requests = pytest.importorskip('requests')

from lepton_jax import generate, lora, sample, train  # pylint: disable=g-import-not-at-top
from lepton_jax.data import chat
from lepton_jax.model import Transformer
from lepton_jax.model.config import LoraConfig
from lepton_jax.serve import api, server
from tests.conftest import tiny_config

TIMEOUT = 60  # Seconds any one HTTP call may take.


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running(served: api.Served, start_engine: bool = True):
  """`served` on a free port of 127.0.0.1 in a thread; yields its base URL."""
  if start_engine:
    served.engine.start()
  port = free_port()
  http = server.uvicorn_server(served, '127.0.0.1', port, drain_s=5)
  thread = threading.Thread(target=http.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + TIMEOUT
  while not http.started:
    assert thread.is_alive() and time.monotonic() < deadline, 'the server did not start'
    time.sleep(0.02)
  try:
    yield f'http://127.0.0.1:{port}'
  finally:
    http.should_exit = True
    thread.join(TIMEOUT)
    if start_engine:
      served.engine.stop()


@pytest.fixture(scope='module')
def lepton_workdir(tmp_path_factory):
  """(config, workdir) of a tiny byte-level run trained for 10 steps."""
  tmp_path = tmp_path_factory.mktemp('run')
  config = tiny_config(tmp_path, total_steps=10, **{'model.max_seq_len': 64})
  train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  return config, str(tmp_path / 'workdir')


@pytest.fixture(scope='module')
def lepton_run(lepton_workdir):
  """(model, variables, tokenizer) of that run."""
  return sample.load(*lepton_workdir)


@pytest.fixture(scope='module')
def lepton_server(lepton_run):
  model, variables, tokenizer = lepton_run
  served = server.build(model, variables, tokenizer, 'tiny', max_batch=4, max_queue=32,
                        max_body_bytes=64 * 1024)
  with running(served) as url:
    yield url, served


def client(url: str, **kw) -> 'openai.OpenAI':
  return openai.OpenAI(base_url=url + '/v1', api_key=kw.pop('api_key', 'unused'),
                       timeout=TIMEOUT, max_retries=0, **kw)


def expected_text(lepton_run, ids, max_new, **sampling) -> str:
  model, variables, tokenizer = lepton_run
  new = generate.generate(model, variables, [ids], max_new, stop_ids=tokenizer.eos_ids,
                          **sampling)[0]
  return tokenizer.decode(new)


def text_ids(tokenizer, text: str) -> list[int]:
  return [tokenizer.eos_id] + tokenizer.encode(text)  # Bytes have no bos: documents follow eos.


PROMPTS = ['line 3: the quick', 'line 12', 'the lazy dog 4.\nline']


def test_greedy_completions_equal_generate(lepton_run, lepton_server):
  url, _ = lepton_server
  tokenizer = lepton_run[2]
  response = client(url).completions.create(model='tiny', prompt=PROMPTS, max_tokens=12,
                                            temperature=0)
  assert [c.index for c in response.choices] == [0, 1, 2]
  for prompt, choice in zip(PROMPTS, response.choices):
    assert choice.text == expected_text(lepton_run, text_ids(tokenizer, prompt), 12)
  assert response.usage.prompt_tokens == sum(len(text_ids(tokenizer, p)) for p in PROMPTS)
  ids = text_ids(tokenizer, PROMPTS[0])
  by_ids = client(url).completions.create(model='tiny', prompt=ids, max_tokens=12, temperature=0)
  assert by_ids.choices[0].text == response.choices[0].text


def test_streamed_text_joined_equals_the_unstreamed_text(lepton_server):
  url, _ = lepton_server
  kw = dict(model='tiny', prompt=PROMPTS[:2], max_tokens=20, temperature=0)
  whole = client(url).completions.create(**kw)
  chunks = list(client(url).completions.create(**kw, stream=True,
                                               stream_options={'include_usage': True}))
  for choice in whole.choices:
    parts = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
    assert ''.join(p.text for p in parts) == choice.text
    assert parts[-1].finish_reason == choice.finish_reason
  assert chunks[-1].usage.model_dump() == whole.usage.model_dump() and not chunks[-1].choices
  raw = requests.post(url + '/v1/completions', json={**kw, 'stream': True}, timeout=TIMEOUT)
  assert raw.headers['content-type'].startswith('text/event-stream')
  assert raw.text.rstrip().endswith('data: [DONE]')


def test_a_stop_string_ends_the_text_before_it(lepton_run, lepton_server):
  url, _ = lepton_server
  tokenizer = lepton_run[2]
  free = expected_text(lepton_run, text_ids(tokenizer, PROMPTS[0]), 20)
  stop = free[5:8]
  kw = dict(model='tiny', prompt=PROMPTS[0], max_tokens=20, temperature=0,
            stop=[stop, 'never seen'])
  cut = client(url).completions.create(**kw).choices[0]
  assert cut.text == free[:free.index(stop)] and cut.finish_reason == 'stop'
  streamed = list(client(url).completions.create(**kw, stream=True))
  assert ''.join(c.choices[0].text for c in streamed) == cut.text
  assert streamed[-1].choices[0].finish_reason == 'stop'
  assert client(url).completions.create(**{**kw, 'stop': None}).choices[0].finish_reason == \
      'length'


def test_echo_with_logprobs_scores_the_prompt(lepton_run, lepton_server):
  """What lm-eval's log-likelihood requests send and read."""
  url, _ = lepton_server
  model, variables, tokenizer = lepton_run
  ids = text_ids(tokenizer, 'line 7: the quick brown fox')
  response = client(url).completions.create(model='tiny', prompt=ids, max_tokens=1,
                                            temperature=0, logprobs=1, echo=True, seed=1234)
  logprobs = response.choices[0].logprobs
  assert len(logprobs.token_logprobs) == len(ids) + 1 and logprobs.token_logprobs[0] is None
  logprobs_TV = jax.nn.log_softmax(model.apply(variables, np.array([ids]))[0], axis=-1)
  expected = np.asarray(logprobs_TV[np.arange(len(ids) - 1), ids[1:]])
  np.testing.assert_allclose(logprobs.token_logprobs[1:len(ids)], expected, atol=1e-5)
  greedy_T = np.asarray(logprobs_TV.argmax(-1))
  for position in range(1, len(ids)):
    top = logprobs.top_logprobs[position]
    assert len(top) == 1 and np.isclose(max(top.values()), logprobs_TV[position - 1].max())
    assert (ids[position] == greedy_T[position - 1]) == \
        (logprobs.token_logprobs[position] == max(top.values()))
  assert response.choices[0].text.startswith(tokenizer.decode(ids))
  scored = client(url).completions.create(model='tiny', prompt=ids, max_tokens=0, echo=True,
                                          logprobs=0)
  assert scored.choices[0].logprobs.token_logprobs == logprobs.token_logprobs[:-1]
  assert scored.usage.completion_tokens == 0


def test_sampling_follows_the_seed_as_generate_does(lepton_run, lepton_server):
  url, _ = lepton_server
  tokenizer = lepton_run[2]
  model, variables, _ = lepton_run
  ids = text_ids(tokenizer, PROMPTS[1])
  kw = dict(model='tiny', prompt=PROMPTS[1], max_tokens=10, temperature=1.0, top_p=0.9, seed=5,
            n=2)
  response = client(url).completions.create(**kw)
  expected = generate.generate(model, variables, [ids] * 2, 10, temperature=1.0, top_p=0.9,
                               seed=5, stop_ids=tokenizer.eos_ids)
  assert [c.text for c in response.choices] == [tokenizer.decode(e) for e in expected]
  assert [c.text for c in client(url).completions.create(**kw).choices] == \
      [c.text for c in response.choices]


def test_chat_renders_the_model_chat_format(lepton_run, lepton_server):
  url, _ = lepton_server
  tokenizer = lepton_run[2]
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'line'}]
  ids = chat.encode(tokenizer, messages, add_generation_prompt=True)[0]
  response = client(url).chat.completions.create(model='tiny', messages=messages, max_tokens=8,
                                                 temperature=0)
  assert response.choices[0].message.content == expected_text(lepton_run, ids, 8)
  assert response.choices[0].message.role == 'assistant'
  assert response.usage.prompt_tokens == len(ids)
  chunks = list(client(url).chat.completions.create(model='tiny', messages=messages,
                                                    max_tokens=8, temperature=0, stream=True))
  assert ''.join(c.choices[0].delta.content or '' for c in chunks) == \
      response.choices[0].message.content
  tokenized = requests.post(url + '/tokenize', json={'messages': messages}, timeout=TIMEOUT)
  assert tokenized.json()['tokens'] == ids


BAD_REQUESTS = [
    ({'prompt': 'x' * 70}, 400, 'prompt'),  # 71 tokens with the eos before it; context 64.
    ({'prompt': 'hi', 'max_tokens': -1}, 400, 'max_tokens'),
    ({'prompt': 'hi', 'max_tokens': 70}, 400, 'max_tokens'),
    ({'prompt': 'hi', 'temperature': -0.5}, 400, 'temperature'),
    ({'prompt': 'hi', 'top_p': 0}, 400, 'top_p'),
    ({'prompt': 'hi', 'top_p': 1.5}, 400, 'top_p'),
    ({'prompt': [1, 300]}, 400, 'prompt'),
    ({'prompt': []}, 400, 'prompt'),
    ({'prompt': 'hi', 'logprobs': 9}, 400, 'logprobs'),
    ({'prompt': 'hi', 'n': 0}, 400, 'n'),
    ({'prompt': 3.5}, 400, 'prompt'),
    ({'max_tokens': 3}, 400, 'prompt'),
    ({'prompt': 'hi', 'model': 'other'}, 404, 'model'),
]


@pytest.mark.parametrize('body, status, param', BAD_REQUESTS)
def test_bad_requests_get_openai_errors(lepton_server, body, status, param):
  url, _ = lepton_server
  response = requests.post(url + '/v1/completions', json={'model': 'tiny', **body},
                           timeout=TIMEOUT)
  assert response.status_code == status
  error = response.json()['error']
  assert set(error) == {'message', 'type', 'param', 'code'} and error['code'] == status
  assert error['param'] == param and '\n' not in error['message']


def test_malformed_bodies_unknown_routes_and_the_openai_client_errors(lepton_server):
  url, _ = lepton_server
  for raw in (b'{"prompt": ', b'[1, 2]', b'\xff\xfe'):
    response = requests.post(url + '/v1/completions', data=raw, timeout=TIMEOUT)
    assert response.status_code == 400 and response.json()['error']['code'] == 400
  big = requests.post(url + '/v1/completions', json={'prompt': 'x' * 100_000}, timeout=TIMEOUT)
  assert big.status_code == 413 and 'limit' in big.json()['error']['message']
  assert requests.get(url + '/v2/nothing', timeout=TIMEOUT).json()['error']['code'] == 404
  with pytest.raises(openai.BadRequestError, match='temperature'):
    client(url).completions.create(model='tiny', prompt='hi', temperature=-1)
  with pytest.raises(openai.NotFoundError):
    client(url).completions.create(model='nope', prompt='hi')
  with pytest.raises(openai.BadRequestError, match='max_tokens'):
    client(url).chat.completions.create(model='tiny', max_tokens=99,
                                        messages=[{'role': 'user', 'content': 'hi'}])
  with pytest.raises(openai.BadRequestError, match='role'):
    client(url).chat.completions.create(model='tiny', messages=[{'role': 'x', 'content': 'hi'}])


def test_models_health_and_tokenizer_endpoints(lepton_run, lepton_server):
  url, _ = lepton_server
  tokenizer = lepton_run[2]
  assert [m.id for m in client(url).models.list().data] == ['tiny']
  assert requests.get(url + '/health', timeout=TIMEOUT).json()['status'] == 'ok'
  tokenized = requests.post(url + '/tokenize', json={'prompt': 'héllo',
                                                     'add_special_tokens': False},
                            timeout=TIMEOUT).json()
  assert tokenized['tokens'] == tokenizer.encode('héllo') and tokenized['count'] == 6
  with_prefix = requests.post(url + '/tokenize', json={'prompt': 'hi'}, timeout=TIMEOUT).json()
  assert with_prefix['tokens'] == text_ids(tokenizer, 'hi')
  detokenized = requests.post(url + '/detokenize', json={'tokens': tokenized['tokens']},
                              timeout=TIMEOUT).json()
  assert detokenized == {'prompt': 'héllo'}
  info = requests.get(url + '/tokenizer_info', timeout=TIMEOUT).json()
  assert info['model_max_length'] == 64


def test_metrics_count_requests_tokens_and_latencies(lepton_server):
  url, _ = lepton_server
  client(url).completions.create(model='tiny', prompt='line', max_tokens=5, temperature=0)
  requests.post(url + '/v1/completions', json={'prompt': 'hi', 'top_p': 0}, timeout=TIMEOUT)
  text = requests.get(url + '/metrics', timeout=TIMEOUT).text
  for series in ('lepton_requests_total{endpoint="/v1/completions",status="200"}',
                 'lepton_requests_total{endpoint="/v1/completions",status="400"}',
                 'lepton_queue_depth', 'lepton_running_batch_size', 'lepton_prompt_tokens_total',
                 'lepton_generation_tokens_total', 'lepton_time_to_first_token_seconds_bucket',
                 'lepton_inter_token_latency_seconds_bucket'):
    assert series in text, series
  generated = [line for line in text.splitlines()
               if line.startswith('lepton_generation_tokens_total')]
  assert float(generated[0].split()[-1]) >= 5


def test_an_api_key_is_required_when_set(lepton_server):
  _, served = lepton_server
  keyed = api.Served(engine=served.engine, tokenizer=served.tokenizer, name='tiny',
                     vocab_size=served.vocab_size, api_key='sesame')
  with running(keyed, start_engine=False) as url:  # The same engine, already running.
    with pytest.raises(openai.AuthenticationError):
      client(url, api_key='wrong').completions.create(model='tiny', prompt='hi', max_tokens=2)
    response = requests.get(url + '/v1/models', timeout=TIMEOUT)
    assert response.status_code == 401 and response.json()['error']['code'] == 401
    assert requests.get(url + '/health', timeout=TIMEOUT).status_code == 200
    ok = client(url, api_key='sesame').completions.create(model='tiny', prompt='hi', max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_a_client_that_disconnects_frees_its_slot(lepton_server):
  url, served = lepton_server
  body = json.dumps({'model': 'tiny', 'prompt': 'line', 'max_tokens': 60, 'temperature': 0,
                     'stream': True}).encode()
  for stream in (True, False):
    body = json.dumps({'model': 'tiny', 'prompt': 'line', 'max_tokens': 60, 'stream': stream})
    with socket.create_connection(('127.0.0.1', int(url.rsplit(':', 1)[1]))) as s:
      s.sendall(f'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                f'Content-Length: {len(body)}\r\n\r\n{body}'.encode())
      deadline = time.monotonic() + TIMEOUT
      while served.engine.running == 0:  # Admitted: it holds a slot.
        assert time.monotonic() < deadline
        time.sleep(0.005)
    deadline = time.monotonic() + TIMEOUT
    while not served.engine.idle:
      assert time.monotonic() < deadline, 'the disconnected request kept its slot'
      time.sleep(0.01)


def test_a_full_queue_and_a_draining_server_answer_503(lepton_run):
  model, variables, tokenizer = lepton_run
  served = server.build(model, variables, tokenizer, 'tiny', max_batch=1, max_queue=1)
  with running(served, start_engine=False) as url:  # Nothing takes requests off the queue.
    body = {'model': 'tiny', 'prompt': 'hi', 'max_tokens': 2}
    answers = []
    held = threading.Thread(target=lambda: answers.append(requests.post(
        url + '/v1/completions', json=body, timeout=TIMEOUT)))
    held.start()
    while served.engine.queue_depth == 0:
      time.sleep(0.01)
    for stream in (False, True):
      full = requests.post(url + '/v1/completions', json={**body, 'stream': stream},
                           timeout=TIMEOUT)
      assert full.status_code == 503 and 'already waiting' in full.json()['error']['message']
    served.engine.drain()
    draining = requests.post(url + '/v1/chat/completions', timeout=TIMEOUT, json={
        'model': 'tiny', 'messages': [{'role': 'user', 'content': 'hi'}]})
    assert draining.status_code == 503 and 'shutting down' in draining.json()['error']['message']
    served.engine.stop()  # Ends the waiting request, unanswered: 503.
    held.join(TIMEOUT)
    assert answers[0].status_code == 503 and 'stopped' in answers[0].json()['error']['message']


def test_adapters_are_models_of_their_names_and_mix_in_one_batch(lepton_run):
  model, variables, tokenizer = lepton_run
  adapted = Transformer(dataclasses.replace(model.cfg, lora=LoraConfig(targets=('q', 'v'), rank=4)))
  fresh = nn.unbox(adapted.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))['params']
  adapters = {name: jax.tree.map(lambda x, k=jax.random.key(seed): x + 0.3 * jax.random.normal(
      k, x.shape), lora.adapter_of(fresh)) for seed, name in ((1, 'alpha'), (2, 'beta'))}
  with pytest.raises(ValueError, match="'alpha' is the base model's name"):
    server.build(adapted, variables, tokenizer, 'alpha', adapters=adapters)
  served = server.build(adapted, variables, tokenizer, 'tiny', max_batch=4, adapters=adapters)
  adapter_set = lora.AdapterSet(variables)
  for name, adapter in adapters.items():
    adapter_set.add(name, adapter)
  with running(served) as url:
    assert [m.id for m in client(url).models.list().data] == ['tiny', 'alpha', 'beta']
    ids = text_ids(tokenizer, PROMPTS[0])
    for name in ('tiny', 'alpha', 'beta'):
      completion = client(url).completions.create(model=name, prompt=PROMPTS[0], max_tokens=8,
                                                  temperature=0)
      expected = generate.generate(
          adapted if name != 'tiny' else model,
          adapter_set.variables(name) if name != 'tiny' else variables, [ids], 8,
          stop_ids=tokenizer.eos_ids)[0]
      assert completion.model == name
      assert completion.choices[0].text == tokenizer.decode(expected), name
    with pytest.raises(openai.NotFoundError, match="serves \\['tiny', 'alpha', 'beta'\\]"):
      client(url).completions.create(model='gamma', prompt='x', max_tokens=1)


def test_a_lepton_lora_run_serves_as_an_adapter_of_its_base(lepton_workdir, lepton_run,
                                                             tmp_path):
  from lepton_jax.serve import __main__ as serve_main  # pylint: disable=g-import-not-at-top
  _, base_dir = lepton_workdir
  model, variables, tokenizer = lepton_run
  lora_config = tiny_config(tmp_path, total_steps=6, init_from=f'workdir:{base_dir}', **{
      'model.max_seq_len': 64, 'lora.targets': ('q', 'v'), 'lora.rank': 4,
      'optimizer.learning_rate': 5e-2, 'optimizer.warmup_steps': 1})
  lora_dir = str(tmp_path / 'lora')
  train.train_and_evaluate(lora_config, lora_dir)
  adapted, adapters = serve_main.load_adapters([f'ft={lora_dir}'], model, None)
  trained, trained_variables, _ = sample.load(lora_config, lora_dir)
  assert adapted.cfg == trained.cfg and list(adapters) == ['ft']
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                   adapters['ft'], lora.adapter_of(trained_variables['params'])))
  served = server.build(adapted, variables, tokenizer, 'tiny', max_batch=4, adapters=adapters)
  ids = text_ids(tokenizer, PROMPTS[1])
  with running(served) as url:
    texts = {name: client(url).completions.create(model=name, prompt=PROMPTS[1], max_tokens=8,
                                                  temperature=0).choices[0].text
             for name in ('tiny', 'ft')}
  for name, (m, v) in {'tiny': (model, variables), 'ft': (trained, trained_variables)}.items():
    expected = generate.generate(m, v, [ids], 8, stop_ids=tokenizer.eos_ids)[0]
    assert texts[name] == tokenizer.decode(expected), name
  assert texts['ft'] != texts['tiny']  # The adapter changes what the base says.


def test_bad_adapter_flags_are_one_line_errors(lepton_run, tmp_path):
  from lepton_jax.serve import __main__ as serve_main  # pylint: disable=g-import-not-at-top
  model = lepton_run[0]
  with pytest.raises(ValueError, match=r"--adapter='sql': expected NAME=PATH"):
    serve_main.load_adapters(['sql'], model, None)
  with pytest.raises(FileNotFoundError, match=r'is neither a PEFT adapter directory'):
    serve_main.load_adapters([f'sql={tmp_path}'], model, None)
  (tmp_path / 'adapter_config.json').write_text('{}')
  with pytest.raises(ValueError, match=r'a PEFT adapter needs its base model as --hf_dir'):
    serve_main.load_adapters([f'sql={tmp_path}'], model, None)
  assert serve_main.load_adapters([], model, None) == (model, {})
