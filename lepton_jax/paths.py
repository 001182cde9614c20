"""Files on a local disk and on object stores (gs://) alike, through etils.epath."""
import os

from etils import epath


def is_remote(path: epath.PathLike) -> bool:
  """True for an object-store URL (gs://...): no appending, no atomic rename, no `**` globs."""
  return '://' in os.fspath(path)


def write_atomically(path: epath.PathLike, data: bytes) -> None:
  """Writes `path` whole or not at all, so a crash never leaves a partial file behind.

  An object store replaces an object whole already; on a local disk the data goes to a temporary
  file that is then renamed over `path`.
  """
  path = epath.Path(path)
  if is_remote(path):
    path.write_bytes(data)
    return
  partial = path.with_name(f'{path.name}.{os.getpid()}.tmp')
  partial.write_bytes(data)
  partial.replace(path)
