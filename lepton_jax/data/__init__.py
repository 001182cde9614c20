"""Data: tokenizers, text sources and the packed, shuffled, per-process batch pipeline."""
from lepton_jax.data import filters
from lepton_jax.data.formats import FORMATS
from lepton_jax.data.formats import TOKENIZED_FORMATS
from lepton_jax.data.pipeline import make_eval_batches
from lepton_jax.data.pipeline import make_train_iterator
from lepton_jax.data.pipeline import tokenize_documents
from lepton_jax.data.sources import load_documents
from lepton_jax.data.sources import SOURCES
from lepton_jax.data.tokenizers import build_tokenizer
from lepton_jax.data.tokenizers import document_start
from lepton_jax.data.tokenizers import Tokenizer
from lepton_jax.data.tokenizers import TOKENIZERS
