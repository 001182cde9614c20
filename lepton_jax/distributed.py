"""Multi-host start-up: join this process to the others through JAX's own distributed runtime.

Entry points call `initialize()` once, before any other JAX use, with the values of the
multi-host flags (lepton_jax/cli.py). It picks one of three modes:

  flags     --coordinator_address, --num_processes and --process_id are all given: join that
            cluster (a localhost CPU test, or any cluster JAX does not detect by itself).
  detected  a multi-host Cloud TPU slice, a SLURM step with several tasks or an Open MPI job with
            several ranks: `jax.distributed.initialize()` reads everything from the environment.
  single    anything else: one process, nothing to join.
"""
import os
import pathlib
import urllib.request
from collections.abc import Callable, Mapping

from absl import logging
import jax

# The variables JAX's own cluster detection reads for each launcher (jax/_src/clusters). We only
# decide *whether* to join; JAX reads their values.
_SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID')
_OPENMPI_VARS = ('OMPI_MCA_orte_hnp_uri', 'OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_LOCAL_RANK')

_GCE_METADATA_URL = 'http://metadata.google.internal/computeMetadata/v1/instance/attributes/'


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int | None = None,
               default_cpu_devices: Callable[[int], int] | None = None) -> str:
  """Joins the multi-process job this process belongs to, if any; returns the mode chosen.

  `cpu_devices` splits a CPU host into that many JAX devices; without it, a single process
  takes `default_cpu_devices(cores)` when given, unless the environment already sets a count.
  Either only shapes the CPU backend: on a TPU or GPU host the accelerator stays the default.
  Call before any other JAX use: it starts the backend to log the device counts.
  """
  mode = detect_mode(coordinator_address, num_processes, process_id, os.environ)
  if cpu_devices is None and default_cpu_devices and mode == 'single' and not (
      jax.config.jax_num_cpu_devices > 0
      or 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '')):
    cpu_devices = default_cpu_devices(len(os.sched_getaffinity(0)))
  if cpu_devices:
    jax.config.update('jax_num_cpu_devices', cpu_devices)
  if mode != 'single':
    # Cross-process collectives on the CPU backend need an implementation. gloo is today's
    # default; pinning it keeps CPU clusters working whatever the default becomes. It does not
    # touch the TPU or GPU backends.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if mode == 'flags':
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif mode != 'single':
    jax.distributed.initialize()
  logging.info(
      'distributed: mode=%s process %d of %d, %d local devices, %d global devices',
      mode, jax.process_index(), jax.process_count(), jax.local_device_count(),
      jax.device_count())
  return mode


def is_coordinator() -> bool:
  """True on the one process that logs, writes summaries and prints samples."""
  return jax.process_index() == 0


def detect_mode(coordinator_address: str | None, num_processes: int | None,
                process_id: int | None, environ: Mapping[str, str]) -> str:
  """'flags', 'cloud_tpu', 'slurm', 'openmpi' or 'single'; see the module docstring."""
  given = dict(coordinator_address=coordinator_address, num_processes=num_processes,
               process_id=process_id)
  missing = [f'--{name}' for name, value in given.items() if value is None]
  if not missing:
    return 'flags'
  if len(missing) < len(given):
    raise ValueError(f'{", ".join(missing)} missing: give --coordinator_address, '
                     '--num_processes and --process_id together, or none to detect the cluster.')
  if _is_multislice(environ) or _tpu_hosts_in_slice(environ) > 1:
    return 'cloud_tpu'
  if _launcher_world_size(environ, 'SLURM_NTASKS', _SLURM_VARS, 'srun') > 1:
    return 'slurm'
  if _launcher_world_size(environ, 'OMPI_COMM_WORLD_SIZE', _OPENMPI_VARS, 'mpirun') > 1:
    return 'openmpi'
  return 'single'


def _launcher_world_size(environ: Mapping[str, str], size_var: str,
                         required_vars: tuple[str, ...], launcher: str) -> int:
  """Processes the launcher started, checking JAX will find the rest of what it needs."""
  size = int(environ.get(size_var, '1'))
  absent = [var for var in required_vars if var not in environ]
  if size > 1 and absent:
    raise ValueError(
        f'{size_var}={size} but {", ".join(absent)} unset: start each process with {launcher}, '
        'or give --coordinator_address, --num_processes and --process_id.')
  return size


def _is_multislice(environ: Mapping[str, str]) -> bool:
  # Set on every host of a multislice job (GKE JobSet, XPK); slices then talk over the network.
  return 'MEGASCALE_COORDINATOR_ADDRESS' in environ


def _tpu_hosts_in_slice(environ: Mapping[str, str]) -> int:
  """Hosts of the Cloud TPU slice this VM belongs to; 0 when not on a Cloud TPU VM.

  GKE puts the host list in the environment; a TPU VM made with gcloud keeps it in the GCE
  metadata server, which is where JAX reads it too.
  """
  hosts = (environ.get('TPU_PROCESS_ADDRESSES') or environ.get('TPU_WORKER_HOSTNAMES')
           or _gce_metadata('worker-network-endpoints'))
  return len(hosts.split(',')) if hosts else 0


def _gce_metadata(attribute: str) -> str | None:
  """An attribute of this Google Compute Engine VM; None off GCE or when it is not set."""
  if not _on_gce():
    return None
  request = urllib.request.Request(
      _GCE_METADATA_URL + attribute, headers={'Metadata-Flavor': 'Google'})
  # The metadata server is link-local: an HTTP proxy from the environment cannot reach it.
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  try:
    with opener.open(request, timeout=5) as response:
      return response.read().decode().strip()
  except OSError:  # HTTPError 404 when the attribute is unset, URLError when unreachable.
    return None


def _on_gce() -> bool:
  # Every GCE VM, TPU VMs included, names itself in the DMI table; elsewhere we stay offline.
  product = pathlib.Path('/sys/class/dmi/id/product_name')
  return product.exists() and product.read_text().strip() == 'Google Compute Engine'
