"""Device meshes, logical-axis rules and shardings for params, optimizer state and batches.

The mesh has three axes, ("data", "fsdp", "tensor"), sized from config.mesh (one size may be -1:
"the rest of the devices"). Parameters and activations carry logical axis names (see model.py);
MaxText-style rules map them onto mesh axes:

    batch -> ("data", "fsdp")     embed -> "fsdp"     heads, kv_heads, mlp, vocab -> "tensor"

A dim that its mesh axes do not divide (e.g. kv_heads=2 on tensor=4) is replicated instead of
failing. Typical use:

    mesh = make_mesh(config.mesh)
    rules = logical_axis_rules(config.mesh)
    with use_mesh(mesh, rules):
        p_sh = tree_shardings(model, params, mesh, rules)
        o_sh = opt_state_shardings(tx, params, p_sh, mesh)
        params = jax.device_put(params, p_sh)
        opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
        step = jax.jit(train_step, in_shardings=(p_sh, o_sh, batch_sharding(mesh, rules)), ...)

The mesh uses Auto axis types: under jax.make_mesh's default (Explicit) axes, linen's
`with_logical_constraint` fails with an AssertionError.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from subtoken_jax.errors import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = Union[None, str, Tuple[str, ...]]
Rules = Tuple[Tuple[str, MeshAxes], ...]

# Logical axis -> mesh axes. Order matters: a mesh axis is used at most once per array, by the
# first rule that claims it (so activations [batch, length, embed] put batch on (data, fsdp) and
# leave embed unsharded, while weights [embed, mlp] put embed on fsdp).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("norm", None),
    ("lora_rank", None),
    ("router", None),
)


# ----------------------------------------------------------------------------- mesh and processes


def _get(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    if isinstance(config, Mapping) or hasattr(config, "get"):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def mesh_shape(mesh_config: Any, num_devices: int) -> Tuple[int, int, int]:
    """(data, fsdp, tensor) sizes for `num_devices`, resolving one -1 to the remaining devices."""
    sizes = []
    for name in MESH_AXES:
        value = _get(mesh_config, name, 1)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (value < 1 and value != -1):
            raise ConfigError(f"mesh.{name} must be a positive int or -1 (the rest of the devices), got {value!r}")
        sizes.append(int(value))
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got mesh {dict(zip(MESH_AXES, sizes))}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not divide "
                              f"the {num_devices} available devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)} does not match "
                          f"the {num_devices} available devices; set one axis to -1 to use the rest")
    return tuple(sizes)


def make_mesh(mesh_config: Any = None, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axis types over all (or the given) devices.

    mesh_config: a ConfigDict / mapping with `data`, `fsdp`, `tensor` (missing ones are 1; one may be
    -1). None puts every device on "data".
    """
    if mesh_config is None:
        mesh_config = {"data": -1}
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def maybe_initialize_distributed(config: Any) -> bool:
    """Calls jax.distributed.initialize when config.distributed.enabled; returns whether it did.

    config.distributed may set coordinator_address ("host:port"), num_processes, process_id and
    local_device_ids; unset ones are left to JAX's cluster auto-detection (SLURM, TPU pods, ...).
    Call it before anything touches jax.devices(). A second call is a no-op.
    """
    dist = _get(config, "distributed")
    if dist is None or not _get(dist, "enabled", False):
        return False
    if jax.distributed.is_initialized():
        return False
    kwargs = {}
    for key in ("coordinator_address", "num_processes", "process_id", "local_device_ids"):
        value = _get(dist, key)
        if value is not None and value != "" and not (key != "process_id" and value == -1):
            kwargs[key] = value
    if "num_processes" in kwargs and "process_id" in kwargs and not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
        raise ConfigError(f"distributed.process_id={kwargs['process_id']} must be in "
                          f"[0, num_processes={kwargs['num_processes']})")
    log.info("jax.distributed.initialize(%s)", kwargs)
    jax.distributed.initialize(**kwargs)
    return True


# ----------------------------------------------------------------------------- logical axis rules


def _mesh_axes_value(logical: str, value: Any) -> MeshAxes:
    if value is None or value == "" or (isinstance(value, (list, tuple)) and not value):
        return None
    axes = (value,) if isinstance(value, str) else tuple(value)
    for axis in axes:
        if axis not in MESH_AXES:
            raise ConfigError(f"logical axis rule {logical!r} -> {value!r} names unknown mesh axis {axis!r}; "
                              f"mesh axes are {MESH_AXES}")
    return axes[0] if len(axes) == 1 else axes


def logical_axis_rules(mesh_config: Any = None, overrides: Any = None) -> Rules:
    """DEFAULT_RULES, with overrides from `overrides` or `mesh_config.rules`.

    Overrides are a mapping {logical name: mesh axis | [mesh axes] | None} or a sequence of
    (logical name, mesh axes) pairs; overridden names keep their place in the rule order, new ones
    are appended.
    """
    if overrides is None:
        overrides = _get(mesh_config, "rules")
    if overrides is None:
        return DEFAULT_RULES
    if hasattr(overrides, "to_dict"):
        overrides = overrides.to_dict()
    items = list(overrides.items()) if isinstance(overrides, Mapping) else [tuple(pair) for pair in overrides]
    for pair in items:
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ConfigError(f"a logical axis rule must be (logical name, mesh axes), got {pair!r}")
    rules = dict(DEFAULT_RULES)
    for logical, value in items:
        rules[logical] = _mesh_axes_value(logical, value)
    return tuple(rules.items())


def logical_to_mesh_spec(names: Sequence[Optional[str]], rules: Optional[Rules] = None) -> P:
    """Logical dim names -> a PartitionSpec over mesh axes (unknown names are unsharded)."""
    return nn.logical_to_mesh_axes(tuple(names), DEFAULT_RULES if rules is None else rules)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Optional[Rules] = None) -> Iterator[Mesh]:
    """Sets the mesh and the logical axis rules, so the model's activation constraints resolve.

    Trace (first call of) jitted functions inside this context.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES if rules is None else rules):
        yield mesh


# ----------------------------------------------------------------------------- shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, what: str = "array") -> P:
    """Drops mesh axes from dims they do not divide (keeping the longest dividing prefix of a tuple).

    E.g. kv_heads=2 on tensor=4 becomes unsharded on that dim instead of failing at device_put.
    """
    entries = list(spec) + [None] * (len(shape) - len(spec))
    if len(entries) > len(shape):
        raise ValueError(f"{what}: partition spec {spec} has more entries than shape {tuple(shape)} has dims")
    fitted = []
    for dim, (size, axes) in enumerate(zip(shape, entries)):
        if axes is None or axes is P.UNCONSTRAINED:
            fitted.append(axes)
            continue
        tup = (axes,) if isinstance(axes, str) else tuple(axes)
        while tup and size % _axis_size(mesh, tup):
            tup = tup[:-1]
        if tup != ((axes,) if isinstance(axes, str) else tuple(axes)):
            log.info("%s: mesh axes %s do not divide dim %d (size %d); using %s on it", what, axes, dim, size,
                     tup or "replication")
        fitted.append(None if not tup else (tup[0] if len(tup) == 1 else tup))
    while fitted and fitted[-1] is None:
        fitted.pop()
    return P(*fitted)


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _fit_sharding_tree(shardings, shapes, mesh: Mesh):
    def fit(path, sharding, leaf):
        return NamedSharding(mesh, fit_spec(sharding.spec, np.shape(leaf), mesh, _path_name(path)))

    return jax.tree_util.tree_map_with_path(fit, shardings, shapes)


def param_shardings(model: nn.Module, init_args: Sequence[Any], mesh: Mesh, rules: Optional[Rules] = None,
                    collection: str = "params", **init_kwargs):
    """NamedShardings for the unboxed `collection` tree that model.init(*init_args) would make.

    Nothing is computed: the shapes come from jax.eval_shape. Dims that their mesh axes do not
    divide are replicated.
    """
    rules = DEFAULT_RULES if rules is None else rules
    abstract = jax.eval_shape(lambda *a: model.init(*a, **init_kwargs), *init_args)[collection]
    specs = nn.get_partition_spec(abstract)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    return _fit_sharding_tree(shardings, _strip_boxes(abstract), mesh)


def _strip_boxes(tree):
    # Not nn.meta.unbox: under a set mesh it applies sharding constraints, which fail on ShapeDtypeStructs.
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def _logical_names_by_path(model: nn.Module, seq_len: int = 1):
    """{param path tuple: logical names} of a DecoderLM-like model (input ids [1, seq_len])."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))["params"]
    flat = traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: isinstance(x, nn.meta.AxisMetadata))
    return {path: (tuple(box.names) if isinstance(box, nn.LogicallyPartitioned) else None)
            for path, box in flat.items()}


def tree_shardings(model: nn.Module, tree, mesh: Mesh, rules: Optional[Rules] = None):
    """NamedShardings for any sub-tree of the model's params (e.g. the trainable or frozen part).

    `tree` is a nested dict of arrays or ShapeDtypeStructs with the model's param paths; each leaf's
    own shape decides divisibility. Paths the model does not have are replicated (with a warning).
    """
    rules = DEFAULT_RULES if rules is None else rules
    flat = traverse_util.flatten_dict(tree)
    if not flat:
        return tree
    names = _logical_names_by_path(model)
    out = {}
    for path, leaf in flat.items():
        what = "/".join(map(str, path))
        if path not in names:
            log.warning("%s is not a parameter of %s; replicating it", what, type(model).__name__)
        logical = names.get(path)
        spec = P() if logical is None else logical_to_mesh_spec(logical, rules)
        out[path] = NamedSharding(mesh, fit_spec(spec, np.shape(leaf), mesh, what))
    return traverse_util.unflatten_dict(out)


def opt_state_shardings(tx: optax.GradientTransformation, params, param_shardings_tree, mesh: Mesh):
    """Shardings of tx.init(params): per-param state (adam mu/nu, ...) like its param, the rest replicated.

    jax.jit(tx.init)(sharded params) would put every state leaf on one device (its zeros are
    constants), so derive them here and pass them as out_shardings of a jitted tx.init.
    """
    abstract = jax.eval_shape(tx.init, params)
    rep = replicated(mesh)
    return optax.tree_map_params(tx, lambda _, sharding: sharding, abstract, param_shardings_tree,
                                 transform_non_params=lambda _: rep)


def batch_sharding(mesh: Mesh, rules: Optional[Rules] = None) -> NamedSharding:
    """Sharding of [batch, length] (or any [batch, ...]) inputs: batch over the rule's mesh axes, the rest whole.

    The spec names only the leading dim, so one sharding fits every leaf of a batch dict.
    """
    spec = logical_to_mesh_spec(("batch",), rules)
    return NamedSharding(mesh, spec)


def batch_shards(mesh: Mesh, rules: Optional[Rules] = None) -> int:
    """How many ways the batch dim is split (the global batch size must be a multiple)."""
    spec = logical_to_mesh_spec(("batch",), rules)
    return _axis_size(mesh, spec[0] if len(spec) else None)


def check_batch_size(batch_size: int, mesh: Mesh, rules: Optional[Rules] = None) -> None:
    shards = batch_shards(mesh, rules)
    if batch_size % shards:
        raise ConfigError(f"batch_size={batch_size} must be a multiple of the {shards} batch shards of mesh "
                          f"{dict(mesh.shape)}")


# ----------------------------------------------------------------------------- placing trees


def shard_tree(tree, shardings, copy: bool = True):
    """Puts a tree of (host or device) arrays on the mesh; `shardings` is a matching tree or one sharding.

    copy=True never aliases the input's device buffers. jax.device_put (even with may_alias=False,
    jax 0.10.2 on CPU) reuses a device-0 buffer for the device-0 shard of the result, and donating
    that result to a jitted step then deletes the *input* array too ("RuntimeError: Array has been
    deleted"). So device arrays are moved by a jitted identity with out_shardings (fresh buffers) and
    host arrays by device_put. Keep copy=True when the result will be donated.
    """
    if not copy:
        return jax.device_put(tree, shardings)
    leaves, treedef = jax.tree.flatten(tree)
    if isinstance(shardings, jax.sharding.Sharding):
        targets = [shardings] * len(leaves)
    else:
        targets = treedef.flatten_up_to(shardings)
    on_device = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    out = list(leaves)
    if on_device:
        moved = jax.jit(lambda xs: xs, out_shardings=[targets[i] for i in on_device])([leaves[i] for i in on_device])
        for i, x in zip(on_device, moved):
            out[i] = x
    host = [i for i in range(len(leaves)) if i not in set(on_device)]
    if host:
        for i, x in zip(host, jax.device_put([leaves[i] for i in host], [targets[i] for i in host])):
            out[i] = x
    return jax.tree.unflatten(treedef, out)


def abstract_tree(tree, shardings=None):
    """ShapeDtypeStructs of a tree, carrying `shardings` (a matching tree or one sharding) if given.

    Use as restore targets or for jax.eval_shape / jit lowering.
    """
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def put_batch(batch, mesh: Mesh, rules: Optional[Rules] = None):
    """Puts a host batch (tree of [batch, ...] numpy arrays) on the mesh, batch-sharded.

    With one process the batch is the global batch. With several, each process passes its own
    slice (its share of the global batch), assembled with jax.make_array_from_process_local_data.
    """
    sharding = batch_sharding(mesh, rules)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def describe(shardings) -> dict:
    """{'path': 'PartitionSpec(...)'} for logging which dims went where."""
    flat = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
    return {_path_name(path): str(getattr(s, "spec", s)) for path, s in flat}


# ----------------------------------------------------------------------------- running under an active mesh
#
# Evaluation and generation do not take shardings as arguments: they run under `use_mesh` (or
# `generate(..., mesh=)`), place their inputs with the helpers below and constrain what they build
# inside jit with `constrain`, so the same code runs on one device (no mesh: every helper is a no-op).


def active_mesh() -> Optional[Mesh]:
    """The mesh set by `use_mesh` / jax.set_mesh, or None. Call outside jit (inside, see `constrain`)."""
    mesh = jax.sharding.get_mesh()
    return None if mesh is None or mesh.empty else mesh


def active_rules() -> Rules:
    """The logical axis rules of the enclosing `use_mesh` (DEFAULT_RULES when none are set)."""
    rules = nn.get_logical_axis_rules()
    return tuple(rules) if rules else DEFAULT_RULES


def logical_sharding(names: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                     rules: Optional[Rules] = None) -> NamedSharding:
    """The NamedSharding of an array of `shape` whose dims have logical `names` (non-dividing dims whole)."""
    spec = logical_to_mesh_spec(names, DEFAULT_RULES if rules is None else rules)
    return NamedSharding(mesh, fit_spec(spec, shape, mesh, "/".join(str(n) for n in names)))


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """Sharding constraint by logical dim names under the active mesh; x unchanged without one.

    Works inside jit (it reads the abstract mesh the trace runs under). Dims the mesh axes do not
    divide stay whole, as in `fit_spec`: SmolLM2's 3 KV heads on tensor=2 are replicated, not an error.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = fit_spec(logical_to_mesh_spec(names, active_rules()), x.shape, mesh, "/".join(str(n) for n in names))
    return jax.lax.with_sharding_constraint(x, spec)


def place_batch_leading(tree):
    """Puts every array of `tree` on the active mesh, split on its leading (batch) dim; no-op without a mesh.

    Arrays already placed on that mesh are kept; scalars and dims the batch axes do not divide are
    replicated. Used for prompts, masks and captured prefill states (all [batch, ...]).
    """
    mesh = active_mesh()
    if mesh is None:
        return tree
    rules = active_rules()

    def place(x):
        if x is None:
            return x
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
            return x
        shape = np.shape(x)
        names = ("batch",) + (None,) * (len(shape) - 1) if shape else ()
        return jax.device_put(x, logical_sharding(names, shape, mesh, rules))

    return jax.tree.map(place, tree)


def batch_rows(rows: int) -> int:
    """`rows` rounded up to a multiple of the active mesh's batch shards (rows itself without a mesh)."""
    mesh = active_mesh()
    if mesh is None:
        return rows
    shards = batch_shards(mesh, active_rules())
    return -(-rows // shards) * shards


def place_params(model: nn.Module, params):
    """Params on the active mesh by the model's logical rules (FSDP / tensor); params unchanged without one.

    Trees that are not the model's params (a predictor's, a routed adapter's extra leaves) are
    replicated, leaf by leaf, with a log line rather than a warning.
    """
    mesh = active_mesh()
    if mesh is None:
        return params
    leaves = jax.tree.leaves(params)
    if leaves and all(isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
                      for x in leaves):
        return params  # placed already (e.g. by eval, once): skip re-deriving the shardings per call
    return shard_tree(params, tree_shardings(model, params, mesh, active_rules()), copy=False)


def replicate(tree):
    """Every array of `tree` replicated on the active mesh (no-op without one): small shared state."""
    mesh = active_mesh()
    if mesh is None:
        return tree
    return jax.device_put(tree, replicated(mesh))


def to_host(x) -> np.ndarray:
    """A (possibly sharded) array as one numpy array on every process (gathered across hosts if needed)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def check_config_mesh(config: Any, batch_size: int) -> None:
    """A ConfigError now if config.mesh does not fit the devices or batch_size does not split over its batch axes."""
    if jax.device_count() > 1:
        check_batch_size(batch_size, make_mesh(_get(config, "mesh")))


@contextlib.contextmanager
def config_mesh(config: Any, batch_size: int) -> Iterator[Optional[Mesh]]:
    """Runs the body under config.mesh (as `use_mesh`) on several devices; yields None on one device.

    For eval and predictor training: one device runs exactly the single-device code (no mesh at all);
    with several, batches split over the batch axes (batch_size a multiple of their size) and params
    follow the logical rules.
    """
    if jax.device_count() == 1:
        yield None
        return
    mesh = make_mesh(_get(config, "mesh"))
    check_batch_size(batch_size, mesh)
    with use_mesh(mesh, logical_axis_rules(_get(config, "mesh"))):
        yield mesh


def split_ways(logical: str, size: int) -> int:
    """How many ways a dim of `size` named `logical` is split under the active mesh (1 without; works in jit)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return 1
    spec = fit_spec(logical_to_mesh_spec((logical,), active_rules()), (size,), mesh, logical)
    return _axis_size(mesh, spec[0]) if len(spec) else 1
