"""How a step spreads its members: in chunks on one device, or over one axis of a device mesh.

Shared by the annealer (``kernel``), the ES step (``es``) and replica
exchange (``tempering``):

- :func:`mesh_axis`: the mesh axis a step built with ``mesh=``/``axis_name=``
  shards over (and the argument checks every builder makes);
- :func:`map_members`: a function over the members' leading axis, as one
  vmap or as ``jax.lax.map`` over vmapped chunks;
- :func:`shard_members`: the same over a mesh axis with ``jax.shard_map``,
  the members padded to a multiple of the axis size;
- :func:`replicated`: a sharding constraint that keeps values on every
  device, so what follows runs in one device's order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from savae_jax import distributed


def mesh_axis(mesh, axis_name: str | None) -> str | None:
    """The axis of ``mesh`` to shard over (``axis_name``, or the mesh's only axis); None without a mesh.

    Raises:
      ValueError: ``mesh`` is not a ``jax.sharding.Mesh``, ``axis_name`` is
        not one of its axes (or None with several), or ``axis_name`` is given
        without a mesh.
    """
    if mesh is not None:
        return distributed.mesh_axis(mesh, axis_name)
    if axis_name is not None:
        raise ValueError(f"axis_name {axis_name!r} given without a mesh")
    return None


def map_members(fn, *members, chunk: int | None = None):
    """``fn`` over the leading axis of ``members``: one vmap, or ``jax.lax.map`` over vmapped chunks of ``chunk``."""
    num = jax.tree_util.tree_leaves(members)[0].shape[0]
    if chunk is None or chunk >= num:
        return jax.vmap(fn)(*members)
    return jax.lax.map(lambda m: fn(*m), members, batch_size=int(chunk))


def shard_members(fn, *members, mesh, axis_name: str):
    """``fn(*members)`` with the members' leading axis sharded over ``mesh[axis_name]``.

    ``fn`` runs on each device's slice (pytrees whose leaves all share the
    leading axis in, such pytrees out). When the number of members is not a
    multiple of the axis size, every leaf is padded with copies of its last
    member, whose outputs are dropped: a caller whose last member is inert
    (the annealer's incumbent, ``active=False``) pads with inert members.
    """
    num = jax.tree_util.tree_leaves(members)[0].shape[0]
    pad = -num % mesh.shape[axis_name]
    if pad:  # copies of the last member, dropped below
        members = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)]), members)
    spec = PartitionSpec(axis_name)
    out = jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(members), out_specs=spec, check_vma=False)(*members)
    return jax.tree_util.tree_map(lambda a: a[:num], out)


def replicated(tree, mesh):
    """``tree`` constrained to be replicated on every device of ``mesh``.

    Left to itself, XLA would keep sharded what follows a sharded evaluation
    (a sum over members, a swap round) and combine the partial results across
    devices in another order than one device does.
    """
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec()))
