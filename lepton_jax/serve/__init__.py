"""`lepton-serve`: an OpenAI-compatible server with continuous batching (the `serve` extra).

engine.py runs the model (slots over generate's prefill, insert and decode step, one thread);
api.py is the HTTP layer (FastAPI) that validates, enqueues and streams; detokenize.py turns
arriving tokens into text; metrics.py holds the Prometheus series; server.py builds and runs it;
__main__.py is the command line. docs/serving.md describes the whole.
"""
