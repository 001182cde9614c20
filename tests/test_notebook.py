"""Runs the notebooks end to end in a fresh kernel, shrunk to seconds of training.

The shrinking follows papermill's convention: a cell of overrides goes in right after the cell
tagged `parameters`. The kernel sees one CPU device, like a Colab CPU runtime, not the 8 simulated
devices of the test process.
"""
import json
import os
import pathlib
import re

import nbclient
import nbformat
import pytest

from tests.conftest import TEXT

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / 'notebooks' / 'quickstart.ipynb'
HF_NOTEBOOK = REPO / 'notebooks' / 'hf_finetune.ipynb'
LORA_NOTEBOOK = REPO / 'notebooks' / 'lora_finetune.ipynb'
ABLATIONS_NOTEBOOK = REPO / 'notebooks' / 'ablations.ipynb'
INT8_NOTEBOOK = REPO / 'notebooks' / 'int8_inference.ipynb'
INTERPRET_NOTEBOOK = REPO / 'notebooks' / 'interpret.ipynb'
COMPRESSION_NOTEBOOK = REPO / 'notebooks' / 'compression.ipynb'
FINETUNE_TASK_NOTEBOOK = REPO / 'notebooks' / 'finetune_task.ipynb'

OVERRIDES = """\
config.total_steps = 30
config.log_every_steps = 5
config.eval_every_steps = 30
config.eval_batches = 2
config.checkpoint_every_steps = 30
config.batch_size = 8
config.seq_len = 64
config.data.tokenizer = 'bytes'
config.model.update(num_layers=2, d_model=64, num_heads=2, num_kv_heads=2, head_dim=32, d_ff=128)
config.optimizer.warmup_steps = 3
config.sample.num_tokens = 32"""

CHECK = """\
import json
print(json.dumps({'first': records[0]['train/loss'], 'final': metrics['train/loss'],
                  'steps': [r['step'] for r in records]}))"""


def _cells_with_tag(nb, tag):
  return [i for i, cell in enumerate(nb.cells) if tag in cell.metadata.get('tags', [])]


def _kernel_env(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TMPDIR=str(tmp_path))
  xla_flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                     env.get('XLA_FLAGS', '')).strip()
  if xla_flags:
    env['XLA_FLAGS'] = xla_flags
  else:
    env.pop('XLA_FLAGS', None)
  env.pop('MPLBACKEND', None)  # The plot must render inline, as in Colab.
  return env



def _run(path: pathlib.Path, tmp_path, overrides: str, last_cell: str | None = None) -> list:
  """Executes the notebook in a fresh kernel with `overrides` in a cell right after its
  `parameters` cell (and `last_cell` appended); returns its code cells, outputs filled in."""
  nb = nbformat.read(path, as_version=4)
  (params,) = _cells_with_tag(nb, 'parameters')
  nb.cells.insert(params + 1, nbformat.v4.new_code_cell(
      overrides, metadata={'tags': ['injected-parameters']}))
  if last_cell:
    nb.cells.append(nbformat.v4.new_code_cell(last_cell))
  nbclient.NotebookClient(nb, kernel_name='python3', timeout=600,
                          resources={'metadata': {'path': str(REPO)}}).execute(
                              env=_kernel_env(tmp_path))
  return [cell for cell in nb.cells if cell.cell_type == 'code']


def _printed(code: list) -> str:
  return '\n'.join(out.get('text', '') for cell in code for out in cell.outputs
                   if out.output_type == 'stream')

@pytest.mark.parametrize('path', [NOTEBOOK, HF_NOTEBOOK, LORA_NOTEBOOK, ABLATIONS_NOTEBOOK,
                                  INT8_NOTEBOOK, INTERPRET_NOTEBOOK, COMPRESSION_NOTEBOOK,
                                  FINETUNE_TASK_NOTEBOOK],
                         ids=lambda path: path.stem)
def test_notebook_is_stored_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  raw_cells = json.loads(path.read_text())['cells']  # nbformat would fill missing ids in.
  assert all(cell.get('id') for cell in raw_cells)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, cell.source


def test_quickstart_runs(tmp_path):
  code = _run(NOTEBOOK, tmp_path, OVERRIDES, last_cell=CHECK)
  (plot_cell,) = [cell for cell in code if 'plt.show()' in cell.source]
  assert any('image/png' in out.get('data', {}) for out in plot_cell.outputs)

  train_output = ''.join(out.get('text', '') for cell in code if 'train_and_evaluate' in cell.source
                         for out in cell.outputs if out.output_type == 'stream')
  assert '--- sample after 30 steps ---' in train_output
  (sample_cell,) = [cell for cell in code if 'sample.load(' in cell.source]
  sampled = ''.join(out.get('text', '') for out in sample_cell.outputs)
  assert sampled.startswith('class ') and '\nimport ' in sampled  # Both prompts, continued.

  result = json.loads(code[-1].outputs[0]['text'])
  assert result['steps'] == [5, 10, 15, 20, 25, 30]
  assert result['final'] < result['first']


@pytest.mark.slow  # A minute or more; tests/test_hf_finetune.py runs the same flow.
def test_hf_finetune_runs(tmp_path):
  pytest.importorskip('transformers')
  printed = _printed(_run(HF_NOTEBOOK, tmp_path, 'FINETUNE_STEPS = 20'))
  assert 'max |lepton - transformers| logits' in printed  # The notebook asserts both bounds.
  assert 'changed by fine-tuning' in printed and "'model.safetensors'" in printed


@pytest.mark.slow  # A minute or more; tests/test_ablate.py runs the same runner.
def test_ablations_runs(tmp_path):
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(TEXT)
  tiny = ['--config.data.source=text', f'--config.data.path={corpus}',
          '--config.data.tokenizer=bytes', '--config.total_steps=4', '--config.eval_every_steps=2',
          '--config.checkpoint_every_steps=4', '--config.eval_batches=1', '--config.batch_size=8',
          '--config.seq_len=32', '--config.model.max_seq_len=32', '--config.model.d_model=32',
          '--config.model.num_layers=1', '--config.model.num_heads=2',
          '--config.model.num_kv_heads=1', '--config.model.head_dim=16', '--config.model.d_ff=64']
  code = _run(ABLATIONS_NOTEBOOK, tmp_path, f'SEEDS = 1\nOVERRIDES = {tiny!r}')
  (run_cell,) = [cell for cell in code if 'scripts/ablate.py' in cell.source]
  progress = ''.join(out.get('text', '') for out in run_cell.outputs).splitlines()
  assert len(progress) == 4 and all(': ok in' in line for line in progress)
  (table_cell,) = [cell for cell in code if 'table.md' in cell.source]
  (table,) = [out['data']['text/markdown'] for out in table_cell.outputs]
  assert table.startswith('| mlp | norm | eval/bits_per_byte |') and table.count('1 ok') == 4
  (plot_cell,) = [cell for cell in code if 'curves.png' in cell.source]
  assert sum('image/png' in out.get('data', {}) for out in plot_cell.outputs) == 2


LORA_OVERRIDES = """\
BASE_STEPS = 30
LORA_STEPS = 30
from configs import stdlib_tiny as _tiny
_get = _tiny.get_config
def _small(arg=None):  # A 2-layer model: seconds, not minutes.
  config = _get(arg)
  config.batch_size = 8
  config.seq_len = 64
  config.eval_batches = 2
  config.model.update(num_layers=2, d_model=64, num_heads=2, num_kv_heads=2, head_dim=32, d_ff=128)
  return config
_tiny.get_config = _small"""


@pytest.mark.slow  # Two minutes; test_lora.py, test_peft_methods.py, test_hf.py check the same.
def test_lora_finetune_runs(tmp_path):
  printed = _printed(_run(LORA_NOTEBOOK, tmp_path, LORA_OVERRIDES))
  assert 'held-out email/ + xml/ loss: base' in printed  # The notebook asserts LoRA < base.
  assert 'max |merged - adapted| logits' in printed
  # The PEFT family's table: a row per method (the notebook asserts the matched budgets).
  assert all(f'\n{method} ' in printed for method in (
      'LoRA all-linear r=8', 'AdaLoRA r=12 -> 8', 'Houlsby b=32', 'Pfeiffer b=64',
      'prompt tuning, 20 tokens'))


@pytest.mark.slow  # 120 steps of training; tests/test_quant.py checks the same losses.
def test_int8_inference_runs(tmp_path):
  # The LoRA notebook's small model; 120 steps so that quality differences mean something.
  printed = _printed(_run(INT8_NOTEBOOK, tmp_path, LORA_OVERRIDES.replace(
      'BASE_STEPS = 30\nLORA_STEPS = 30', 'TRAIN_STEPS = 120')))
  assert 'perplexity changes checked' in printed  # The notebook asserts the bounds.
  assert 'reloaded exactly: True' in printed and 'KV cache per token and layer' in printed


@pytest.mark.slow  # A minute or more; tests/test_interpret.py checks the same functions.
def test_interpret_runs(tmp_path):
  code = _run(INTERPRET_NOTEBOOK, tmp_path, LORA_OVERRIDES.replace(
      'BASE_STEPS = 30\nLORA_STEPS = 30', 'TRAIN_STEPS = 30'))
  printed = _printed(code)
  assert 'patching checked' in printed and 'attributions sum to' in printed  # Asserted inside.
  assert 'strongest induction head' in printed and 'next-token loss' in printed
  images = sum('image/png' in out.get('data', {}) for cell in code for out in cell.outputs)
  # Two attention maps, induction scores, the logit lens, two patching maps, attribution.
  assert images == 7
  assert any('text/html' in out.get('data', {}) for cell in code for out in cell.outputs)


def test_compression_runs(tmp_path):
  # The LoRA notebook's small model on two packages of the corpus: SentencePiece trains on them
  # and tokenizes them in a second, the whole library would take most of the test.
  overrides = LORA_OVERRIDES.replace(
      'BASE_STEPS = 30\nLORA_STEPS = 30', 'TRAIN_STEPS = 30\nFINETUNE_STEPS = 4\nSTUDENT_STEPS = 10'
  ).replace('  return config', "  config.data.include = ('email/*', 'xml/*')\n  return config")
  code = _run(COMPRESSION_NOTEBOOK, tmp_path, overrides)
  printed = _printed(code)
  assert 'pruned weights checked' in printed  # The notebook asserts the zeros and the shapes.
  assert '50% of FFN channels: d_ff 128 -> 64' in printed
  assert 'fine-tuning kept the 2:4 zeros: True; changed the kept weights: True' in printed
  assert 'half-depth student eval loss: from scratch' in printed
  tables = [out['data']['text/markdown'] for cell in code for out in cell.outputs
            if 'text/markdown' in out.get('data', {})]
  assert len(tables) == 3 and all(t.startswith('| model | parameters | non-zero |') for t in tables)
  assert len(tables[-1].splitlines()) == 2 + 7  # Header, rule and a row for each of the 7 models.
  (plot_cell,) = [cell for cell in code if 'plt.show()' in cell.source]
  assert any('image/png' in out.get('data', {}) for out in plot_cell.outputs)


@pytest.mark.slow  # 90 s; test_classify_hf.py, test_quant.py, test_quant_training.py check it.
def test_finetune_task_runs(tmp_path):
  pytest.importorskip('transformers')
  # The LoRA notebook's small model, pretrained on two packages as in test_compression_runs; the
  # classifier reads all four packages' functions with that tokenizer.
  overrides = LORA_OVERRIDES.replace(
      'BASE_STEPS = 30\nLORA_STEPS = 30', 'BASE_STEPS = 30\nCLASSIFY_STEPS = 60\nQAT_STEPS = 10'
  ).replace('  return config', "  config.data.include = ('email/*', 'xml/*')\n  return config")
  code = _run(FINETUNE_TASK_NOTEBOOK, tmp_path, overrides)
  printed = _printed(code)
  # The notebook asserts each bound: above the majority label, PTQ near f32, the QAT run's int8
  # model scoring what it trained and near PTQ after as many float steps, transformers' logits
  # equal to lepton's.
  assert "fine-tuned: test accuracy" in printed and "(always 'idlelib':" in printed
  assert 'PTQ W8A8 per channel: test accuracy' in printed
  assert "eval split of training: QAT run's last evaluation" in printed
  assert 'LlamaForSequenceClassification: max |lepton - transformers| logits' in printed
  tables = [out['data']['text/markdown'] for cell in code for out in cell.outputs
            if 'text/markdown' in out.get('data', {})]
  assert len(tables) == 1 and tables[0].startswith('| model | variables | test accuracy |')
  assert len(tables[0].splitlines()) == 2 + 6  # f32, two PTQ schemes, f32 continued, its PTQ, QAT.
  (confusion_cell,) = [cell for cell in code if 'plot_confusion' in cell.source]
  assert any('image/png' in out.get('data', {}) for out in confusion_cell.outputs)
