"""lepton-serve on a tiny Hugging Face Llama: greedy outputs equal transformers' generate, chat
is tokenized as apply_chat_template tokenizes it, lm-eval's `local-completions` scores a task as
lepton's own lm-eval model does, and the `lepton-serve` process holds 32 concurrent clients with
malformed requests and disconnects, then drains on SIGTERM and exits 0."""
import concurrent.futures
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

openai = pytest.importorskip('openai')
requests = pytest.importorskip('requests')
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from lepton_jax import generate, hf  # pylint: disable=g-import-not-at-top
from lepton_jax.serve import server
from tests.conftest import save_tiny_hf_llama
from tests.test_serve import TIMEOUT, client, free_port, running

REPO = pathlib.Path(__file__).parent.parent
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                 "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def save_chat_llama(directory: pathlib.Path) -> None:
  """The tiny Llama with a tokenizer that writes bos as Llama's does (add_special_tokens) and a
  chat template that writes bos itself."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  save_tiny_hf_llama(directory)
  tokenizer = tokenizers.Tokenizer.from_file(str(directory / 'tokenizer.json'))
  tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
      single='<s> $A', special_tokens=[('<s>', 0)])
  tokenizer.save(str(directory / 'tokenizer.json'))
  (directory / 'chat_template.jinja').write_text(CHAT_TEMPLATE)


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('llama')
  save_chat_llama(directory)
  return directory


@pytest.fixture(scope='module')
def hf_server(hf_dir):
  model, variables = hf.load(str(hf_dir))
  served = server.build(model, variables, hf.load_tokenizer(str(hf_dir)), 'llama', max_batch=4)
  with running(served) as url:
    yield url, model, variables


def transformers_greedy(hf_dir, ids: list[int], max_new: int) -> list[int]:
  reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                             do_sample=False, max_new_tokens=max_new, pad_token_id=1)
  new = out[0, len(ids):].tolist()
  return new[:new.index(1)] if 1 in new else new  # eos </s> = 1 ends it, unreturned.


def test_greedy_completions_and_chat_equal_transformers(hf_dir, hf_server):
  url, model, variables = hf_server
  auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
  prompt = 'line 4: the quick brown'
  ids = auto(prompt).input_ids
  assert ids[0] == 0  # bos, as vLLM would tokenize it.
  expected = transformers_greedy(hf_dir, ids, 16)
  assert generate.generate(model, variables, [ids], 16, eos_id=1)[0] == expected
  response = client(url).completions.create(model='llama', prompt=prompt, max_tokens=16,
                                            temperature=0)
  assert response.choices[0].text == auto.decode(expected, skip_special_tokens=True)
  assert response.usage.prompt_tokens == len(ids)

  messages = [{'role': 'user', 'content': 'the lazy dog'}]
  chat_ids = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                      return_dict=True)['input_ids']
  assert chat_ids.count(0) == 1  # The template's bos, no second one.
  expected = transformers_greedy(hf_dir, chat_ids, 12)
  reply = client(url).chat.completions.create(model='llama', messages=messages, max_tokens=12,
                                              temperature=0)
  assert reply.choices[0].message.content == auto.decode(expected, skip_special_tokens=True)
  assert reply.usage.prompt_tokens == len(chat_ids)
  info = requests.get(url + '/tokenizer_info', timeout=TIMEOUT).json()
  assert info['chat_template'] == CHAT_TEMPLATE and info['eos_token'] == '</s>'


MC = [{'context': 'line 3: the quick brown', 'choices': [' fox', ' cat', ' dog'], 'label': 0},
      {'context': 'line 5: the quick brown fox jumps over the', 'choices': [' lazy', ' x'],
       'label': 1},
      {'context': 'line 6: the ', 'choices': ['quick', 'slow brown'], 'label': 0}]
GEN = [{'prompt': 'line 3: the quick', 'target': ' brown fox'},
       {'prompt': 'line 4:', 'target': ' the quick'}]
TASKS = {
    'serve_mc': (MC, 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
                     'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
                     'target_delimiter: ""\nmetric_list:\n  - metric: acc\n'),
    'serve_gen': (GEN, 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
                       'doc_to_target: "{{target}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
                       '  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n'),
}


def test_lm_eval_local_completions_scores_as_lepton_does(hf_dir, hf_server, tmp_path):
  os.environ['HF_DATASETS_OFFLINE'] = '1'
  os.environ.setdefault('HF_DATASETS_CACHE',
                        os.path.join(tempfile.gettempdir(), 'lepton_jax_test_hf_datasets'))
  lm_eval = pytest.importorskip('lm_eval')
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  import lm_eval.models.openai_completions  # pylint: disable=g-import-not-at-top,unused-import
  from lepton_jax.evals import harness  # pylint: disable=g-import-not-at-top
  url, _, _ = hf_server
  for name, (records, body) in TASKS.items():
    (tmp_path / f'{name}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    (tmp_path / f'{name}.yaml').write_text(
        f'task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n'
        f'    test: {tmp_path / name}.jsonl\ntest_split: test\n{body}')
  evaluate = lambda model, model_args: lm_eval.simple_evaluate(
      model=model, model_args=model_args, tasks=list(TASKS), bootstrap_iters=0,
      log_samples=True, task_manager=TaskManager(include_path=str(tmp_path),
                                                 include_defaults=False))
  # lm-eval's API models put no bos before a context unless the tokenizer adds it: this one does
  # (add_bos_token), as lepton scores text after the document start.
  served = evaluate('local-completions', {
      'base_url': url + '/v1/completions', 'model': 'llama', 'tokenizer_backend': 'huggingface',
      'tokenizer': str(hf_dir), 'add_bos_token': True, 'max_length': 64, 'batch_size': 4,
      'max_retries': 1})
  own = evaluate(harness.LeptonLM(hf_dir=str(hf_dir), batch_size=8), None)
  resps = lambda results, task: [r for s in sorted(results['samples'][task],
                                                   key=lambda s: s['doc_id']) for r in s['resps']]
  # Each response is [answer]: (log-likelihood, is_greedy), or a completion.
  for [(got_logprob, got_greedy)], [(want_logprob, want_greedy)] in zip(
      resps(served, 'serve_mc'), resps(own, 'serve_mc'), strict=True):
    assert float(got_logprob) == pytest.approx(float(want_logprob), abs=1e-4)
    assert got_greedy == want_greedy
  assert resps(served, 'serve_gen') == resps(own, 'serve_gen')
  assert served['results']['serve_mc']['acc,none'] == own['results']['serve_mc']['acc,none']


def test_the_remote_tokenizer_of_lm_eval_reads_the_server(hf_dir, hf_server):
  pytest.importorskip('lm_eval')
  from lm_eval.utils import RemoteTokenizer  # pylint: disable=g-import-not-at-top
  url, _, _ = hf_server
  remote = RemoteTokenizer(url + '/v1/completions', timeout=TIMEOUT)
  tokenizer = hf.load_tokenizer(str(hf_dir))
  text = 'line 9: the quick brown fox'
  assert remote.encode(text) == tokenizer.encode(text)
  assert remote.decode(tokenizer.encode(text)) == text
  assert remote.eos_token_id == 1 and remote.bos_token_id == 0


# --- the lepton-serve process -------------------------------------------------------------------

CLIENTS = 32


def wait_until_up(url: str, process: subprocess.Popen) -> None:
  deadline = time.monotonic() + 180
  while True:
    assert process.poll() is None, process.stderr.read().decode()[-3000:]
    assert time.monotonic() < deadline, 'lepton-serve did not come up'
    try:
      if requests.get(url + '/health', timeout=1).status_code == 200:
        return
    except requests.ConnectionError:
      time.sleep(0.2)


def drop_after_first_chunk(port: int, body: dict) -> None:
  """A streaming client that goes away after the first bytes of its answer."""
  data = json.dumps(body)
  with socket.create_connection(('127.0.0.1', port), timeout=TIMEOUT) as s:
    s.sendall(f'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
              f'Content-Length: {len(data)}\r\n\r\n{data}'.encode())
    s.recv(64)


def test_32_clients_malformed_requests_disconnects_and_sigterm(tmp_path):
  """Every well-formed answer equals its prompt's greedy tokens alone; none is lost; /health
  answers throughout; SIGTERM lets the requests in flight finish and the process exit 0."""
  save_tiny_hf_llama(tmp_path)  # No chat template: chat answers 400.
  model, variables = hf.load(str(tmp_path))
  tokenizer = hf.load_tokenizer(str(tmp_path))
  words = 'the quick brown fox jumps over the lazy dog'.split()
  budgets = (4, 9, 17)  # A decode loop compiles per budget: few, for the sequential results.
  jobs = [(f'line {i}: ' + ' '.join(words[:i % 9]), budgets[i % 3]) for i in range(CLIENTS)]
  ids = [[0] + tokenizer.encode(prompt) for prompt, _ in jobs]
  expected = [None] * CLIENTS
  for budget in budgets:  # A padded batch decodes each row as alone (tests/test_generate.py).
    rows = [i for i in range(CLIENTS) if jobs[i][1] == budget]
    new = generate.generate(model, variables, [ids[i] for i in rows], budget, eos_id=1)
    for i, tokens in zip(rows, new):
      expected[i] = tokenizer.decode(tokens)

  port = free_port()
  url = f'http://127.0.0.1:{port}'
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(
      tempfile.gettempdir(), 'lepton_jax_test_xla_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', XLA_FLAGS='', JAX_PLATFORMS='cpu')
  process = subprocess.Popen(
      [sys.executable, '-m', 'lepton_jax.serve', f'--hf_dir={tmp_path}', f'--port={port}',
       '--max_batch=8', '--max_queue=64', '--drain_s=60'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    wait_until_up(url, process)
    health, stop_health = [], threading.Event()

    def poll_health():
      while not stop_health.is_set():
        health.append(requests.get(url + '/health', timeout=TIMEOUT).status_code)
        time.sleep(0.05)

    def complete(job):
      prompt, max_tokens = job
      return client(url).completions.create(model=tmp_path.name, prompt=prompt, temperature=0,
                                            max_tokens=max_tokens).choices[0].text

    def malformed(i):
      bodies = ['{"prompt": ', json.dumps({'prompt': 'x', 'temperature': -1}),
                json.dumps({'prompt': 'x' * 100}), json.dumps({'prompt': 'x', 'model': 'no'}),
                json.dumps({'messages': [{'role': 'user', 'content': 'hi'}]})]
      path = '/v1/chat/completions' if i == 4 else '/v1/completions'
      return requests.post(url + path, data=bodies[i], timeout=TIMEOUT).status_code

    poller = threading.Thread(target=poll_health)
    poller.start()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS + 8) as pool:
      answers = [pool.submit(complete, job) for job in jobs]
      dropped = [pool.submit(drop_after_first_chunk, port,
                             {'prompt': 'line', 'max_tokens': 60, 'stream': True})
                 for _ in range(3)]
      errors = [pool.submit(malformed, i) for i in range(5)]
      assert [a.result(timeout=300) for a in answers] == expected
      assert [e.result(timeout=TIMEOUT) for e in errors] == [400, 400, 400, 404, 400]
      for d in dropped:
        d.result(timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while requests.get(url + '/health', timeout=TIMEOUT).json()['running']:
      assert time.monotonic() < deadline, 'a dropped request kept its slot'
      time.sleep(0.05)
    stop_health.set()
    poller.join()
    assert health and set(health) == {200}

    # In flight at SIGTERM (each has drawn its first token): finished, not cut off.
    in_flight = [i for i in range(CLIENTS) if jobs[i][1] == max(budgets)][:2]
    streams = [client(url).completions.create(model=tmp_path.name, prompt=jobs[i][0],
                                              max_tokens=jobs[i][1], temperature=0, stream=True)
               for i in in_flight]
    firsts = [next(iter(stream)).choices[0].text for stream in streams]
    process.send_signal(signal.SIGTERM)
    texts = [first + ''.join(c.choices[0].text for c in stream)
             for first, stream in zip(firsts, streams)]
    assert texts == [expected[i] for i in in_flight]
    assert process.wait(timeout=TIMEOUT) == 0
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
