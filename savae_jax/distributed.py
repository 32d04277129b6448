"""Scale-out on JAX's own machinery: device meshes and ``jax.distributed``.

One host, many devices::

    mesh = distributed.make_mesh()                      # all devices, axis "devices"
    sa = simulated_annealing(..., mesh=mesh)            # proposals sharded over devices
    params, history = fit(..., optimizer=optax.adam(1e-3), mesh=mesh)  # batch sharded

Many processes (hosts, or several processes on one machine)::

    distributed.initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=0)
    mesh = distributed.make_mesh()                      # now the GLOBAL devices

The mesh is always an explicit ``mesh=`` argument: nothing reads an ambient
mesh when a step is traced, so a jitted step computes the same thing in every
context. ``mesh=None`` is the single-device code.

See docs/distributed.md.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DEFAULT_AXIS = "devices"


def make_mesh(devices=None, axis_name: str = DEFAULT_AXIS) -> Mesh:
    """A one-axis ``Mesh`` over ``devices``.

    Args:
      devices: a list of devices, an int (the first that many of
        ``jax.devices()``) or None (all of ``jax.devices()``: after
        :func:`initialize_distributed`, the devices of every process).
      axis_name: the mesh axis; proposals (annealing) and the batch (Optax)
        are both sharded along it.
    """
    all_devices = jax.devices()
    if devices is None:
        devices = all_devices
    elif isinstance(devices, int) and not isinstance(devices, bool):
        if not 1 <= devices <= len(all_devices):
            raise ValueError(f"devices must be between 1 and {len(all_devices)} "
                             f"(the devices JAX sees), got {devices}")
        devices = all_devices[:devices]
    devices = list(devices)
    if not devices:
        raise ValueError("devices must not be empty")
    return Mesh(np.array(devices), (axis_name,))


def mesh_axis(mesh: Mesh, axis_name: str | None, argument: str = "axis_name") -> str:
    """``axis_name``, or the only axis of ``mesh`` when None (ValueError otherwise)."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"{argument} must name one of the mesh axes {mesh.axis_names} "
                             "(the mesh has more than one)")
        return mesh.axis_names[0]
    if axis_name not in mesh.axis_names:
        raise ValueError(f"{argument} {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    return axis_name


def replicate(tree, mesh: Mesh):
    """Put every array of ``tree`` on every device of ``mesh`` (a global array across processes).

    Every process must pass the same values (true for parameters initialised
    from the same seed and for the same dataset).
    """
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x  # already global
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree)


def to_host(tree):
    """Fully replicated (possibly global) arrays as host-local numpy arrays."""
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def host_local(tree):
    """``tree`` as the caller can use it on this process alone.

    Across processes (``jax.process_count() > 1``) the training state is made
    of global arrays spanning every process's devices; this returns host
    copies (:func:`to_host`) for evaluation, saving and logging. In one
    process it returns ``tree`` unchanged.
    """
    return to_host(tree) if jax.process_count() > 1 else tree


def is_primary() -> bool:
    """True in process 0, the one process that writes a run's files (always True in one process)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process has reached ``barrier(name)``; nothing to do in one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(value):
    """Process 0's ``value`` (a bool or a number) in every process; ``value`` itself in one process.

    For decisions that must not differ between processes although their
    inputs may, such as a wall-clock budget running out: every process must
    take the same number of steps, or the next collective waits forever.
    One collective; a float travels as float32 unless x64 is enabled.
    """
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return type(value)(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def same_everywhere(value: int) -> bool:
    """Whether every process passed the same ``value`` (an int, e.g. a hash); True in one process.

    Every process gets the same answer (one all-gather), so they can all stop
    together with one message instead of some waiting forever in a collective.
    """
    if jax.process_count() == 1:
        return True
    from jax.experimental import multihost_utils

    values = np.asarray(multihost_utils.process_allgather(np.asarray(value % 2**31, np.int32)))
    return bool(np.all(values == values.flat[0]))


_ENV = {
    "coordinator_address": ("JAX_COORDINATOR_ADDRESS", str),
    "num_processes": ("JAX_NUM_PROCESSES", int),
    "process_id": ("JAX_PROCESS_ID", int),
}


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, cpu_collectives: str | None = "gloo",
                           **kwargs) -> None:
    """``jax.distributed.initialize`` with values from arguments or the environment.

    Must run before any other JAX call of the process. A None argument is
    taken from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID`` when set, else left to ``jax.distributed.initialize``
    (which auto-detects SLURM, Open MPI, Cloud TPU, ...).

    Args:
      coordinator_address: "host:port" of process 0's coordinator service.
      num_processes: number of processes.
      process_id: this process's index in [0, num_processes).
      cpu_collectives: ``jax_cpu_collectives_implementation`` to set when the
        CPU backend is used ("gloo": cross-process collectives on CPU;
        None leaves JAX's setting alone).
      **kwargs: passed on to ``jax.distributed.initialize``
        (``local_device_ids``, ``initialization_timeout``, ...).
    """
    values = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id}
    for name, (env, kind) in _ENV.items():
        if values[name] is None and os.environ.get(env):
            try:
                values[name] = kind(os.environ[env])
            except ValueError as err:
                raise ValueError(f"{env}: cannot read {name} from {os.environ[env]!r}") from err
    if values["num_processes"] is not None and values["num_processes"] < 1:
        raise ValueError(f"num_processes must be >= 1, got {values['num_processes']}")
    if values["process_id"] is not None and values["num_processes"] is not None and not (
            0 <= values["process_id"] < values["num_processes"]):
        raise ValueError(f"process_id must be in [0, {values['num_processes']}), got {values['process_id']}")
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if cpu_collectives is not None and (platforms == "" or "cpu" in platforms.split(",")):
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(**{k: v for k, v in values.items() if v is not None}, **kwargs)
