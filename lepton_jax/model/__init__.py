"""The functional Transformer: knows nothing about optimizers, data or files."""
from lepton_jax.model.transformer import ModelConfig, Transformer
