"""Cross-device collectives one execution of a compiled XLA program runs, from its HLO text.

`count(compiled.as_text())` -> {op: (times run, bytes moved)}. An op inside a while loop (the
scanned layers) counts once per iteration, using the loop's known trip count. Bytes are the size
of each op's result (summed over the arrays of a combined op): the gathered array for all-gather,
the reduced arrays for all-reduce, the scattered shard for reduce-scatter. `scripts/estimate_memory.py --collectives` prints the table
for a config and mesh.
"""
import collections
import re

OPS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4,
               'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}

_HEADER = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) ')
_INSTRUCTION = re.compile(r'^\s+(?:ROOT )?%?[\w.\-]+ = (.*?) ([a-z\-]+)\(')
_SHAPE = re.compile(r'\b(' + '|'.join(DTYPE_BYTES) + r')\[([\d,]*)\]')
_CALLEE = re.compile(r'\b(?:body|calls|to_apply|branch_computations|true_computation|'
                     r'false_computation)=\{?(%?[\w.\-]+(?:, %?[\w.\-]+)*)')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _shape_bytes(dtype: str, dims: str) -> int:
  size = DTYPE_BYTES[dtype]
  for dim in filter(None, dims.split(',')):
    size *= int(dim)
  return size


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """Computation name -> its instruction lines, and the name of the entry computation."""
  bodies, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    if line.endswith('{') and (header := _HEADER.match(line)):
      current = header.group(1)
      bodies[current] = []
      entry = current if line.startswith('ENTRY') else entry
    elif line.startswith('}'):
      current = None
    elif current is not None:
      bodies[current].append(line)
  return bodies, entry


def _collective(line: str) -> tuple[str, int] | None:
  """(op, result bytes) when `line` is a collective; async `-start` ops count, `-done` do not."""
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  result, opcode = match.groups()
  op = opcode.removesuffix('-start')
  if op not in OPS:
    return None
  sizes = [_shape_bytes(*shape) for shape in _SHAPE.findall(result)]
  # A combined op returns a tuple of results; an async start returns (operands..., result,
  # [context]), whose largest array is the result.
  return op, max(sizes) if opcode.endswith('-start') else sum(sizes)


def count(hlo_text: str) -> dict[str, tuple[int, int]]:
  """{op: (times run per execution, bytes)} for each collective op the program runs."""
  bodies, entry = _computations(hlo_text)
  totals = collections.defaultdict(lambda: [0, 0])

  def visit(name: str, times: int) -> None:
    for line in bodies.get(name, ()):
      if found := _collective(line):
        op, size = found
        totals[op][0] += times
        totals[op][1] += times * size
      trip_count = _TRIP_COUNT.search(line)
      for callees in _CALLEE.findall(line):
        for callee in callees.split(', '):
          visit(callee.lstrip('%'), times * (int(trip_count.group(1)) if trip_count else 1))

  visit(entry, 1)
  return {op: tuple(totals[op]) for op in OPS if op in totals}


def format_table(counts: dict[str, tuple[int, int]]) -> str:
  lines = [f'{"collectives per step":32s} {"count":>8s} {"GiB":>10s}']
  for op, (times, size) in counts.items():
    lines.append(f'{op:32s} {times:8d} {size / 2**30:10.3f}')
  return '\n'.join(lines)
