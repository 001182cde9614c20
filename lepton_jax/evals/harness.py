"""The `lepton` model of EleutherAI's lm-evaluation-harness (the `eval` extra: lm-eval 0.4.13).

Importing this module registers it. `lepton-lm-eval` (or `python -m lepton_jax.evals.harness`)
is the `lm_eval` command with it registered:

  lepton-lm-eval --model lepton --tasks arc_easy \
      --model_args config=configs/stdlib_tiny.py,workdir=/tmp/stdlib_tiny[,step=400]
  lepton-lm-eval --model lepton --model_args hf_dir=/models/Qwen2.5-0.5B --tasks ...

  from lepton_jax.evals import harness  # registers 'lepton'
  lm_eval.simple_evaluate(model='lepton', model_args={'config': ..., 'workdir': ...}, ...)

model_args: config (a config file, FILE.py[:ARG], or a ConfigDict), then workdir [and step] or
hf_dir; batch_size (rows per forward pass, default the config's). Requests are scored by
lepton_jax.evals.scoring, the same code as lepton's own tasks, so both give the same numbers for
the same text; generation runs lepton_jax.generate.
"""
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lepton_jax import config_lib, evaluate, sharding
from lepton_jax.evals import generation, scoring


@register_model('lepton')
class LeptonLM(LM):
  """A lepton run's checkpoint or a Hugging Face directory, behind lm-eval's three requests."""

  def __init__(self, config=None, workdir: str | None = None, hf_dir: str | None = None,
               step: int | None = None, batch_size: int | str | None = None, **unused):
    del unused  # lm-eval also passes device and max_batch_size; JAX places the model itself.
    super().__init__()
    if isinstance(config, str):
      config = config_lib.load_file(config)
    self.config = config if config is not None else config_lib.base_config()
    if bool(workdir) == bool(hf_dir):
      raise ValueError('model_args: give one of workdir (a lepton run) and hf_dir')
    self.model, self.variables, self.tokenizer = evaluate.load(self.config, workdir, hf_dir,
                                                               step)
    self._mesh = sharding.make_mesh(self.config.mesh)
    self._rules = self.config.mesh.rules
    rows = int(batch_size) if str(batch_size or '').isdigit() else self.config.batch_size
    self._scorer = scoring.Scorer(self.model, self._mesh, self._rules, rows)
    self._completers = {}

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    pairs = [scoring.encode_pair(self.tokenizer, *request.args) for request in requests]
    with sharding.use_mesh(self._mesh, self._rules):
      return self._scorer.loglikelihoods(self.variables, pairs)

  def loglikelihood_rolling(self, requests) -> list[float]:
    prefix = scoring.prefix_id(self.tokenizer)
    pairs = [([prefix], self.tokenizer.encode(request.args[0])) for request in requests]
    with sharding.use_mesh(self._mesh, self._rules):
      return [logprob for logprob, _ in self._scorer.loglikelihoods(self.variables, pairs)]

  def generate_until(self, requests) -> list[str]:
    outputs = [None] * len(requests)
    groups = {}  # Requests with the same settings complete together.
    for index, request in enumerate(requests):
      context, kwargs = request.args
      until = kwargs.get('until') or []
      until = (until,) if isinstance(until, str) else tuple(until)
      temperature = float(kwargs.get('temperature', 0.0)) if kwargs.get('do_sample') else 0.0
      key = (until, int(kwargs.get('max_gen_toks', 256)), temperature)
      groups.setdefault(key, []).append((index, context))
    with sharding.use_mesh(self._mesh, self._rules):
      for (until, max_new_tokens, temperature), members in groups.items():
        completer = self._completer(until, max_new_tokens, temperature)
        texts = completer(self.variables, [context for _, context in members])
        for (index, _), text in zip(members, texts):
          outputs[index] = text
    return outputs

  def _completer(self, until, max_new_tokens: int, temperature: float) -> generation.Completer:
    # Long generations are capped so that some prompt fits the model's window.
    max_new_tokens = min(max_new_tokens, self.model.cfg.max_seq_len // 2)
    key = (until, max_new_tokens, temperature)
    if key not in self._completers:
      self._completers[key] = generation.Completer(
          self.model, self.tokenizer, self._scorer.batch_size, max_new_tokens, until, temperature)
    return self._completers[key]


def main() -> None:
  """`lm_eval`'s command line, with the `lepton` model registered."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  cli_evaluate()


if __name__ == '__main__':
  main()
