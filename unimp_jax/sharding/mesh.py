"""The device mesh and the one table that maps logical axis names to mesh axes.

Every parameter is created with logical axis names (``embed``, ``mlp``, ``heads``, ...), stored as the
``logical_axes`` metadata of its ``nnx.Param``. Activations are constrained with :func:`constrain` at block
boundaries using ``act_*`` names. Which mesh axis a logical name lands on is decided in exactly one place:
``config.mesh.rules``. Changing a sharding strategy is an edit to that table, never to the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

# Parameters are sharded over `fsdp` (ZeRO-3 style) along their model-width dimension and over `tensor`
# (Megatron style) along heads / MLP / vocabulary. Activations are sharded over the batch on `data` x
# `fsdp` and over heads / MLP on `tensor`; their model-width dimension stays whole so that residual adds
# need no communication.
DEFAULT_RULES = (
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('vocab', 'tensor'),
    ('layers', None),
    ('act_batch', ('data', 'fsdp')),
    ('act_seq', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
)

_active_rules: list[tuple] = []


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Resolves a single -1 entry so that the product equals `num_devices`."""
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh: at most one of data/fsdp/tensor may be -1, got {sizes}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh: {num_devices} devices cannot be split into {sizes} (fixed part {known})')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f'mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices; '
        'set one of mesh.data/mesh.fsdp/mesh.tensor to -1 to fill the rest')
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Sequence[str | None], rules, shape: Sequence[int] | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> PartitionSpec:
  """Maps logical names to a PartitionSpec.

  With `shape` and `mesh`, a dimension whose size the mapped mesh axes do not divide is left replicated
  (e.g. a vocabulary of 32,001 on a tensor axis of 8), and a mesh axis already used by an earlier
  dimension is not used twice. `python -m unimp_jax.model.summary` shows where that happened.
  """
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(axes):
    target = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise KeyError(f'logical axis {name!r} has no entry in config.mesh.rules')
    mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    mesh_axes = tuple(a for a in mesh_axes if a not in used)
    if mesh is not None:
      mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
      if shape is not None and shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
        mesh_axes = ()
    used.update(mesh_axes)
    out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*out)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: jax.sharding.Mesh, rules):
  """NamedShardings for an (abstract) nnx.State, from each Variable's `logical_axes` metadata."""

  def one(var):
    axes = var.get_metadata().get('logical_axes', (None,) * len(var.shape))
    return var.replace(NamedSharding(mesh, logical_to_spec(axes, rules, var.shape, mesh)))

  return jax.tree.map(one, state, is_leaf=_is_var)


def data_sharding(mesh: jax.sharding.Mesh, rules, ndim: int) -> NamedSharding:
  """Sharding of a batch-leading input array: batch over data x fsdp, everything else replicated."""
  return NamedSharding(mesh, logical_to_spec(('act_batch',) + (None,) * (ndim - 1), rules))


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules):
  """Makes `mesh` current (jax.set_mesh) and `rules` the table `constrain` reads."""
  _active_rules.append(tuple(rules))
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _active_rules.pop()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical names; a no-op outside `use_mesh`."""
  mesh = jax.sharding.get_abstract_mesh()
  if not _active_rules or mesh.empty:
    return x
  spec = logical_to_spec(axes, _active_rules[-1], x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


def describe(spec: PartitionSpec) -> str:
  return '(' + ', '.join('-' if s is None else '*'.join(np.atleast_1d(s)) for s in spec) + ')'
