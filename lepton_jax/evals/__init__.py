"""Evaluation: the numbers a model is compared by, during training and after it.

  evaluators.py      what config.evals describes, built once and run at each one's cadence
  language_model.py  loss, perplexity, accuracy and bits per byte on a data source
  tasks.py           JSONL task records (multiple choice, cloze, perplexity, generation), HumanEval
  scoring.py         log-likelihoods of token continuations, batched into a few shapes
  generation.py      text completions through lepton_jax.generate, cut at stop strings
  cost.py            parameters, bytes, forward tokens/s, compiled memory
  harness.py         the `lepton` model for lm-evaluation-harness (needs the eval extra)

The command line is lepton_jax/evaluate.py (`lepton-eval`).
"""
from lepton_jax.evals.evaluators import build
from lepton_jax.evals.evaluators import due
from lepton_jax.evals.evaluators import Evaluator
from lepton_jax.evals.evaluators import run
from lepton_jax.evals.evaluators import TYPES
