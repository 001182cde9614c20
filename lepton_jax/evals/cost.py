"""What a model costs: parameters, their bytes by dtype, forward tokens/s and the memory of the
compiled evaluation step."""
import collections
import functools
import statistics
import time

import jax
import numpy as np

from lepton_jax import objectives, sharding, steps


def param_counts(params) -> dict[str, int]:
  """{'params': count, 'param_bytes': bytes, 'param_bytes/DTYPE': bytes of that dtype, ...}."""
  by_dtype = collections.Counter()
  for leaf in jax.tree.leaves(params):
    by_dtype[np.dtype(leaf.dtype).name] += leaf.size * np.dtype(leaf.dtype).itemsize
  counts = {'params': sum(leaf.size for leaf in jax.tree.leaves(params)),
            'param_bytes': sum(by_dtype.values())}
  counts.update({f'param_bytes/{dtype}': size for dtype, size in sorted(by_dtype.items())})
  return counts


def forward_cost(model, variables, mesh: jax.sharding.Mesh, rules, batch: dict[str, np.ndarray],
                 objective: objectives.Objective, repeats: int = 5) -> dict[str, float]:
  """Tokens/s of the objective's evaluation step (the forward pass and its loss sums) on `batch`
  (a global eval batch, of whatever the objective reads: tokens, labels, preference pairs), the
  median of `repeats` timed calls after a compiling one, and what XLA says the compiled step
  holds at its peak: arguments, outputs and temporaries, less what outputs alias."""
  batch_sharding = sharding.batch_sharding(mesh, rules)
  num_tokens = sum(x.size for key, x in batch.items() if key.endswith('inputs'))
  batch = {key: jax.make_array_from_callback(x.shape, batch_sharding, lambda i, x=x: x[i])
           for key, x in batch.items()}
  step = jax.jit(functools.partial(steps.eval_step, model=model, objective=objective),
                 out_shardings=sharding.replicated(mesh))
  compiled = step.lower(variables, batch).compile()
  memory = compiled.memory_analysis()
  jax.block_until_ready(compiled(variables, batch))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(variables, batch))
    seconds.append(time.perf_counter() - start)
  cost = {'forward_tokens_per_sec': num_tokens / statistics.median(seconds)}
  if memory is not None:  # Backends without the analysis return None.
    cost['eval_step_peak_bytes'] = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
                                    memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return cost
