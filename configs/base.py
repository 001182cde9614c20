"""The defaults every experiment starts from (config_lib.base_config), as a file: for commands
whose model comes from elsewhere (--hf_dir) but that take --config.KEY overrides.

  python scripts/quantize.py --hf_dir=/models/Llama-3.2-1B --out=/tmp/llama_int8 \
      --config=configs/base.py --config.quant.weights=int8
"""
from lepton_jax import config_lib


def get_config(arg=None):
  del arg  # The defaults take no argument.
  return config_lib.base_config()
