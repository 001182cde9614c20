"""Ablations: a grid of config overrides run as ordinary lepton runs, collected into a table.

  grid.py    sweeps (sweep files, --sweep flags) crossed into cells, each at several seeds
  runner.py  one lepton-train run per cell: skip the finished, resume the interrupted
  report.py  results.jsonl, table.md (mean +- std, deltas, params, tokens/s) and the plots

The command line is scripts/ablate.py; published ablations are files in configs/sweeps/.
"""
