"""``load`` and ``save`` for treex checkpoints, in every format treex users wrote.

Formats (``format=`` names, as in the fixtures' manifest):

* ``"pickle"`` / ``"cloudpickle"``: a whole module (class, configuration, flags,
  leaves). Read with the restricted unpickler of
  :mod:`normbridge.adapters.treex._unpickle` (nothing from the file runs); arrays
  may be numpy arrays, ``numpy.core.numeric._frombuffer`` (cloudpickle of numpy),
  ``jax._src.device_array.reconstruct_device_array`` (jax 0.3.14–0.3.25) or
  ``jax._src.array._reconstruct_array`` (jax ≥ 0.4.1). :func:`save` writes the
  treex layout (GLOBALs ``treex.nn.norm.BatchNorm``, ``treeo.types.FieldMetadata``,
  ``jax._src.array._reconstruct_array``...), protocol 4 (``pickle``) or 5
  (``cloudpickle``), so that real treex 0.6 could read it too.
* ``"msgpack"``: ``flax.serialization.to_bytes(module.to_dict(static_fields=False))``:
  lists as ``{"0": ...}`` maps, ``None`` as nil, arrays as msgpack ext type 1.
* ``"npz"``: the same leaves flattened with ``/`` (``None`` omitted).

msgpack and npz hold leaves only: ``load(path, template=module)`` fills a copy of
``template`` (same structure, built by the user or loaded from a pickle), checking
every path, shape and dtype; without a template they return the nested dict of
arrays with a warning.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import pickletools
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from typing import IO, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from normbridge import errors
from normbridge._optional import require
from normbridge.adapters.treex import _unpickle as up
from normbridge.adapters.treex.conv import Conv, ConvTranspose
from normbridge.adapters.treex.dropout import Dropout, KeySeq
from normbridge.adapters.treex.extra import InstanceNorm, RMSNorm, SpectralNorm, WeightNorm
from normbridge.adapters.treex.layers import MLP, Embed, Flatten, Lambda, Linear, Sequential
from normbridge.adapters.treex.module import Module
from normbridge.adapters.treex.norm import BatchNorm, GroupNorm, LayerNorm

__all__ = ["CheckpointError", "UnsafePickleError", "load", "save", "state_dict"]

UnsafePickleError = up.UnsafePickleError
Format = Literal["pickle", "cloudpickle", "msgpack", "npz"]
PathOrFile = str | os.PathLike | IO[bytes]


#: ``normbridge.errors.CheckpointError``: every error of :func:`load` is one of its subclasses
#: (``CorruptCheckpointError``: damaged or not a treex checkpoint; ``UnsafeCheckpointError`` /
#: :class:`UnsafePickleError`: refused, nothing built; ``CheckpointMismatchError``: does not fit the template).
CheckpointError = errors.CheckpointError
CorruptCheckpointError = errors.CorruptCheckpointError
CheckpointMismatchError = errors.CheckpointMismatchError


# =============================================================== reading bytes
def _read(path_or_file: PathOrFile) -> tuple[bytes, str]:
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "rb") as fh:
            return fh.read(), os.fspath(path_or_file)
    data = path_or_file.read()
    if not isinstance(data, bytes):
        raise TypeError(f"treex.load: the file object must be opened in binary mode, read() gave {type(data).__name__}")
    return data, getattr(path_or_file, "name", "<file>")


def _is_text_pickle(data: bytes) -> bool:
    """A protocol 0/1 pickle (no PROTO header): its opcodes parse up to a STOP at the very end."""
    if not data or data[-1:] != pickle.STOP:
        return False
    try:
        for _ in pickletools.genops(data):
            pass
    except Exception:
        return False
    return True


def detect_format(data: bytes, source: str = "treex.load") -> Format:
    """``"pickle"`` (protocol 0-5), ``"npz"`` (zip) or ``"msgpack"`` (a map), from the first bytes."""
    if len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return "pickle"
    if data[:2] == b"PK":  # zip: local header, or the end record of an empty archive
        return "npz"
    if data and (0x80 <= data[0] <= 0x8F or data[0] in (0xDE, 0xDF)):
        return "msgpack"
    if _is_text_pickle(data):
        return "pickle"  # protocols 0 and 1 have no header
    raise CorruptCheckpointError(
        f"{source}: unknown checkpoint format: expected a pickle (protocol 0-5), an npz (zip) or a flax "
        f"msgpack map, found {len(data)} bytes starting with {data[:8]!r}"
    )


# ============================================================ pickle → modules
_FLAGS = ("_training", "_frozen", "_initialized")
_NORM_STATIC = {
    "BatchNorm": ("axis", "momentum", "epsilon", "dtype", "use_bias", "use_scale", "bias_init", "scale_init",
                  "axis_name", "axis_index_groups"),
    "LayerNorm": ("epsilon", "dtype", "use_bias", "use_scale", "bias_init", "scale_init"),
    "GroupNorm": ("num_groups", "group_size", "epsilon", "dtype", "use_bias", "use_scale", "bias_init", "scale_init"),
    "RMSNorm": ("epsilon", "dtype", "use_scale", "scale_init"),
    "InstanceNorm": ("epsilon", "dtype", "use_bias", "use_scale", "bias_init", "scale_init"),
}  # fmt: skip
_LEAVES = {
    "BatchNorm": ("mean", "var", "scale", "bias"),
    "LayerNorm": ("scale", "bias"),
    "GroupNorm": ("scale", "bias"),
    "Linear": ("kernel", "bias"),
    "RMSNorm": ("scale",),
    "InstanceNorm": ("scale", "bias"),
    "SpectralNorm": ("u", "sigma"),
    "WeightNorm": ("scale",),
    "Conv": ("kernel", "bias"),
    "ConvTranspose": ("kernel", "bias"),
    "Embed": ("embedding",),
    "KeySeq": ("key",),
}
#: Layers rebuilt as ``cls(*positional, **keywords)`` from their pickled static fields.
_LAYER_ARGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Conv": (("features_out", "kernel_size"), ("strides", "padding", "input_dilation", "kernel_dilation",
             "feature_group_count", "use_bias", "dtype", "param_dtype", "precision", "kernel_init", "bias_init")),
    "ConvTranspose": (("features_out", "kernel_size"), ("strides", "padding", "kernel_dilation", "use_bias",
                      "dtype", "param_dtype", "precision", "kernel_init", "bias_init")),
    "Embed": (("num_embeddings", "features"), ("dtype", "embedding_init")),
    "Dropout": (("rate",), ("broadcast_dims",)),
    "KeySeq": ((), ()),
    "Flatten": ((), ()),
    "MLP": (("features",), ("activation", "use_bias", "dtype", "precision", "kernel_init", "bias_init")),
}  # fmt: skip
#: Fields a layer may lack in the pickle (flax 0.4.1 versions without them): their defaults apply.
_OPTIONAL = {"param_dtype"}
_CLASSES: dict[str, type[Module]] = {
    "BatchNorm": BatchNorm,
    "LayerNorm": LayerNorm,
    "GroupNorm": GroupNorm,
    "Linear": Linear,
    "Sequential": Sequential,
    "Lambda": Lambda,
    "RMSNorm": RMSNorm,
    "InstanceNorm": InstanceNorm,
    "SpectralNorm": SpectralNorm,
    "WeightNorm": WeightNorm,
    "Conv": Conv,
    "ConvTranspose": ConvTranspose,
    "Embed": Embed,
    "Dropout": Dropout,
    "KeySeq": KeySeq,
    "Flatten": Flatten,
    "MLP": MLP,
}


def _value(v: Any, source: str, where: str) -> Any:
    """Placeholders → facade modules, array specs → jax arrays, Refs → their safe targets."""
    if isinstance(v, up.Placeholder):
        return _module(v, source, where)
    if isinstance(v, up.Ref):
        return up.resolve_ref(v)
    if isinstance(v, up.ArraySpec):
        if v.array is None:
            raise CorruptCheckpointError(f"{source}: {where}: array without data")
        return up.to_jax(v.array)
    if isinstance(v, np.ndarray):
        return up.to_jax(v)
    if isinstance(v, up.DTypeSpec):
        raise CorruptCheckpointError(f"{source}: {where}: a bare numpy dtype is not a treex field value")
    if isinstance(v, (up.FunctionStub, up.NamedWrapper)):
        return up.resolve_function(v, source, where)
    if isinstance(v, up.PartialSpec):
        func = _value(v.func, source, f"{where}/func")
        if not callable(func) or isinstance(func, (up.Ref, up.Inert)):
            raise CorruptCheckpointError(
                f"{source}: {where}: functools.partial of {func!r}, which has no safe replacement"
            )
        args = _plain(_value(v.args, source, f"{where}/args"), source, where)
        kwargs = _plain(_value(v.kwargs, source, f"{where}/kwargs"), source, where)
        return functools.partial(func, *args, **kwargs)
    if isinstance(v, (up.Inert, up.InertObject)):
        raise CorruptCheckpointError(f"{source}: {where}: {v!r} is not a treex field value")
    if isinstance(v, list):
        return [_value(x, source, f"{where}/{i}") for i, x in enumerate(v)]
    if isinstance(v, tuple):
        return tuple(_value(x, source, f"{where}/{i}") for i, x in enumerate(v))
    if isinstance(v, dict):
        return {k: _value(x, source, f"{where}/{k}") for k, x in v.items()}
    return v


def _plain(v: Any, source: str, where: str) -> Any:
    """``v`` if it is plain data (numbers, strings, tuples/lists/dicts of them), else a CheckpointError."""
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        return v
    if isinstance(v, (list, tuple)):
        return type(v)(_plain(x, source, where) for x in v)
    if isinstance(v, dict):
        return {k: _plain(x, source, where) for k, x in v.items()}
    raise CorruptCheckpointError(f"{source}: {where}: functools.partial argument {v!r} is not plain data")


def _module(p: up.Placeholder, source: str, where: str) -> Module:
    cls_name = p.qualname.rsplit(".", 1)[-1]
    if cls_name not in _CLASSES:
        raise CorruptCheckpointError(f"{source}: {where}: {p.qualname} is not a module")
    state = p.state
    if state is None:
        raise CorruptCheckpointError(f"{source}: {where}: {p.qualname} has no state")
    label = f"{source}: {where or '<root>'} ({cls_name})"

    def get(field: str) -> Any:
        if field not in state:
            raise CorruptCheckpointError(f"{label}: field {field!r} missing from the pickle")
        return _value(state[field], source, f"{where}/{field}" if where else field)

    try:
        if cls_name in _LAYER_ARGS:
            positional, keywords = _LAYER_ARGS[cls_name]
            kw = {f: get(f) for f in keywords if f in state or f not in _OPTIONAL}
            module = _CLASSES[cls_name](*(get(f) for f in positional), **kw)
            if cls_name == "Dropout":
                key_seq = get("next_key")
                if not isinstance(key_seq, KeySeq):
                    raise CorruptCheckpointError(f"{label}: `next_key` must be a KeySeq module")
                module.next_key = key_seq
            elif cls_name == "MLP":
                _mlp_children(module, state, get, label)
        elif cls_name in _NORM_STATIC:
            module = _CLASSES[cls_name](**{f: get(f) for f in _NORM_STATIC[cls_name]})
        elif cls_name == "Linear":
            kernel_init = _value(state.get("kernel_init"), source, "kernel_init")
            kwargs = {} if not callable(kernel_init) else {"kernel_init": kernel_init}
            module = Linear(
                get("features_out"),
                use_bias=get("use_bias"),
                dtype=get("dtype"),
                precision=get("precision"),
                bias_init=get("bias_init"),
                axis_name=state.get("axis_name"),
                **kwargs,
            )
        elif cls_name == "Lambda":
            module = Lambda(get("f"))
        elif cls_name == "SpectralNorm":
            module = SpectralNorm(
                get("layer"), n_steps=get("n_steps"), epsilon=get("epsilon"),
                error_on_non_matrix=get("error_on_non_matrix"),
            )  # fmt: skip
        elif cls_name == "WeightNorm":
            fa = get("feature_axes")
            module = WeightNorm(
                get("layer"), epsilon=get("epsilon"), use_scale=get("use_scale"), scale_init=get("scale_init"),
                feature_axes=tuple(fa) if isinstance(fa, list) else fa,
            )  # fmt: skip
        else:
            module = Sequential()
            layers = get("layers")
            if not isinstance(layers, list) or not all(isinstance(m, Module) for m in layers):
                raise CorruptCheckpointError(f"{label}: `layers` must be a list of modules")
            module.layers = layers
    except (TypeError, ValueError) as err:
        if isinstance(err, errors.CheckpointError):
            raise
        raise CorruptCheckpointError(f"{label}: bad configuration: {err}") from err
    for leaf in _LEAVES.get(cls_name, ()):
        value = get(leaf)
        if value is not None and not isinstance(value, jax.Array):
            raise CorruptCheckpointError(f"{label}: leaf {leaf!r} must be an array or None, got {type(value).__name__}")
        setattr(module, leaf, value)
    for flag in _FLAGS:
        value = state.get(flag, flag == "_training")
        if not isinstance(value, bool):
            raise CorruptCheckpointError(f"{label}: flag {flag!r} must be a bool, got {value!r}")
        module.__dict__[flag] = value
    if isinstance(state.get("name"), str):
        module.name = state["name"]
    return module


def _mlp_children(module: MLP, state: dict[str, Any], get: Any, label: str) -> None:
    """treex's @compact children: ``_subtrees`` names them, each a ``Linear`` node field."""
    names = state.get("_subtrees")
    if names is None:
        return  # not initialized: no children yet
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) and n.isidentifier() for n in names):
        raise CorruptCheckpointError(f"{label}: `_subtrees` must be a tuple of field names, got {names!r}")
    if len(names) != len(list(module.features)):
        raise CorruptCheckpointError(f"{label}: {len(names)} children for features {module.features!r}")
    for name in names:
        child = get(name)
        if not isinstance(child, Linear):
            raise CorruptCheckpointError(f"{label}: child {name!r} must be a Linear, got {type(child).__name__}")
        module._set_child(name, child)
    module.__dict__["_subtrees"] = tuple(names)


def _from_pickle(data: bytes, source: str) -> Module:
    obj = up.safe_loads(data, source)
    if not isinstance(obj, up.Placeholder):
        raise CorruptCheckpointError(f"{source}: the pickle does not hold a treex module (got {type(obj).__name__})")
    return _module(obj, source, "")


# ======================================================= leaves-only formats
def state_dict(module: Module) -> dict[str, Any]:
    """``module.to_dict(static_fields=False)``: the node leaves as nested dicts/lists."""
    return module.to_dict(static_fields=False)


def _msgpack_unpack(data: bytes, source: str) -> Any:
    msgpack = require("msgpack", facade="treex")

    def ext_hook(code: int, payload: bytes) -> Any:
        if code in (1, 3):  # ndarray / numpy scalar: (shape, dtype name, raw bytes)
            shape, name, raw = msgpack.unpackb(payload, raw=True)
            name = name.decode() if isinstance(name, bytes) else str(name)
            shape = tuple(shape)
            if name == "bfloat16":  # not a numpy dtype name; flax writes it for jnp.bfloat16
                count = int(np.prod(shape, dtype=np.int64))
                if len(raw) != 2 * count:
                    raise CorruptCheckpointError(
                        f"{source}: msgpack bfloat16 array of {len(raw)} bytes for shape {shape}"
                    )
                return np.frombuffer(raw, dtype=jnp.bfloat16).reshape(shape).copy()
            return up._array_from_bytes(raw, up.DTypeSpec(name), shape, "C", f"{source}: msgpack array")
        if code == 2:
            re, im = msgpack.unpackb(payload)
            return complex(re, im)
        raise CorruptCheckpointError(f"{source}: unknown msgpack ext type {code}")

    try:
        return msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.exceptions.ExtraData) as err:
        if isinstance(err, errors.CheckpointError):
            raise
        raise CorruptCheckpointError(f"{source}: not a flax msgpack state dict ({err})") from err


def _npz_unpack(data: bytes, source: str) -> dict[str, Any]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            flat = {k: z[k] for k in z.files}
    except (ValueError, zipfile.BadZipFile) as err:
        raise CorruptCheckpointError(f"{source}: not a numpy npz of arrays ({err})") from err
    nested: dict[str, Any] = {}
    for key, arr in flat.items():
        parts = key.split("/")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CorruptCheckpointError(f"{source}: key {key!r} conflicts with a leaf")
        node[parts[-1]] = arr
    return nested


def _fill(template: Any, state: Any, source: str, path: str, leaves_only_npz: bool) -> Any:
    """A copy of ``template`` (module/list/leaf) with its leaves replaced from ``state``, checked."""
    where = path or "<root>"
    if isinstance(template, Module):
        if not isinstance(state, Mapping):
            raise CheckpointMismatchError(f"{source}: {where}: expected a mapping for {type(template).__name__}")
        new = template.copy()
        expected = {k for k, _ in vars(template).items() if not k.startswith("_") and template._is_node(k)}
        extra = set(state) - expected
        if extra:
            raise CheckpointMismatchError(
                f"{source}: {where}: unexpected entries {sorted(extra)} for {type(template).__name__}"
            )
        for field in sorted(expected):
            sub = f"{path}/{field}" if path else field
            value = getattr(template, field)
            if field not in state:
                if leaves_only_npz and _no_leaves(value):
                    continue  # npz omits None fields and empty modules
                raise CheckpointMismatchError(f"{source}: {sub}: missing from the checkpoint")
            new.__dict__[field] = _fill(value, state[field], source, sub, leaves_only_npz)
        return new
    if isinstance(template, (list, tuple)):
        if isinstance(state, Mapping):
            keys = sorted(state, key=lambda k: int(k) if str(k).isdigit() else -1)
            if any(not str(k).isdigit() for k in keys) or any(int(k) >= len(template) for k in keys):
                raise CheckpointMismatchError(
                    f"{source}: {where}: list entries {keys} do not match {len(template)} items"
                )
            state = [state.get(str(i), state.get(i)) if (str(i) in state or i in state) else _ABSENT
                     for i in range(len(template))]  # fmt: skip
        if not isinstance(state, (list, tuple)) or len(state) != len(template):
            raise CheckpointMismatchError(f"{source}: {where}: expected {len(template)} items")
        out = []
        for i, (t, s) in enumerate(zip(template, state)):
            if s is _ABSENT:
                if leaves_only_npz and _no_leaves(t):
                    out.append(_fill(t, {}, source, f"{path}/{i}", leaves_only_npz) if isinstance(t, Module) else t)
                    continue
                raise CheckpointMismatchError(f"{source}: {path}/{i}: missing from the checkpoint")
            out.append(_fill(t, s, source, f"{path}/{i}", leaves_only_npz))
        return type(template)(out)
    if template is None:
        if state is not None:
            raise CheckpointMismatchError(
                f"{source}: {where}: the template has None here (uninitialized?), file has data"
            )
        return None
    if state is None:
        raise CheckpointMismatchError(f"{source}: {where}: the checkpoint has None, the template an array")
    arr = np.asarray(state)
    t = jnp.asarray(template)
    if arr.shape != t.shape or arr.dtype != t.dtype:
        raise CheckpointMismatchError(
            f"{source}: {where}: shape/dtype {arr.shape} {arr.dtype} in the file, {t.shape} {t.dtype} in the template"
        )
    return up.to_jax(arr, weak_type=bool(getattr(t, "weak_type", False)))


_ABSENT = object()


def _no_leaves(value: Any) -> bool:
    return value is None or (isinstance(value, Module) and not jax.tree_util.tree_leaves(value))


# ===================================================================== load
def load(path_or_file: PathOrFile, template: Module | None = None, *, format: Format | None = None) -> Any:
    """Load a treex checkpoint as facade modules, executing nothing from the file.

    * pickle / cloudpickle: returns the module (``Sequential``, ``Linear``,
      ``Lambda``, ``BatchNorm``, ``LayerNorm``, ``GroupNorm``) with its saved
      configuration, leaves and ``training``/``frozen``/``initialized`` flags. A
      pickle naming any GLOBAL outside the allow-list raises
      :class:`UnsafePickleError` naming it and the file, before anything is built.
      With ``template``, the loaded leaves must also match the template's layout.
    * msgpack / npz: with ``template``, a copy of it with every leaf replaced
      (paths, shapes and dtypes checked, flags and configuration from the
      template); without, the nested dict of arrays and a ``UserWarning``.

    ``format`` overrides detection from the file's first bytes.
    """
    data, source = _read(path_or_file)
    fmt = format or detect_format(data, source)
    if fmt in ("pickle", "cloudpickle"):
        module = _from_pickle(data, source)
        if template is not None:
            _fill(template, state_dict(module), source, "", leaves_only_npz=False)
        return module
    if fmt == "msgpack":
        state = _msgpack_unpack(data, source)
    elif fmt == "npz":
        state = _npz_unpack(data, source)
    else:
        raise ValueError(f"treex.load: unknown format {fmt!r}; expected pickle, cloudpickle, msgpack or npz")
    if template is None:
        warnings.warn(
            f"{source}: a {fmt} checkpoint holds only leaves (no class, configuration or training/frozen flags); "
            "returning the nested dict of arrays. Pass template=<a module of the same structure> to get a module.",
            UserWarning,
            stacklevel=2,
        )
        return jax.tree_util.tree_map(np.asarray, state)
    if not isinstance(template, Module):
        raise TypeError(f"treex.load: template must be a treex facade Module, got {type(template).__name__}")
    return _fill(template, state, source, "", leaves_only_npz=fmt == "npz")


# ===================================================================== save
class _Glob:
    """A GLOBAL to emit by name (never imported)."""

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname


class _Obj:
    """``GLOBAL cls; EMPTY_TUPLE; NEWOBJ; <state>; BUILD``: how treex modules and FieldMetadata pickle."""

    def __init__(self, qualname: str, state: dict[str, Any]) -> None:
        self.qualname, self.state = qualname, state


class _Arr:
    def __init__(self, arr: Any) -> None:
        self.array = np.asarray(arr)
        self.weak = bool(getattr(arr, "weak_type", False))


_SAVE_CLASS = {
    BatchNorm: "treex.nn.norm.BatchNorm",
    LayerNorm: "treex.nn.norm.LayerNorm",
    GroupNorm: "treex.nn.norm.GroupNorm",
    Linear: "treex.nn.linear.Linear",
    Sequential: "treex.nn.sequential.Sequential",
    Lambda: "treex.nn.sequential.Lambda",
    # Additions: not treex classes; named after the facade so that only normbridge's loader reads them.
    RMSNorm: "normbridge.adapters.treex.RMSNorm",
    InstanceNorm: "normbridge.adapters.treex.InstanceNorm",
    SpectralNorm: "normbridge.adapters.treex.SpectralNorm",
    WeightNorm: "normbridge.adapters.treex.WeightNorm",
}


def _value_global(v: Any, where: str) -> Any:
    from normbridge.adapters.treex import module as kinds

    if v is type(None):
        return ("__call__", _Glob("builtins.type"), (None,))
    if v is str:
        return _Glob("builtins.str")
    if isinstance(v, type) and issubclass(v, kinds.TreePart) and v.__module__ == kinds.__name__:
        return _Glob(f"treex.types.{v.__name__}")
    for name in ("float32", "float16", "bfloat16", "float64"):
        if v is getattr(jnp, name):
            return _Glob(f"jax.numpy.{name}")
    for name in ("zeros", "ones"):
        if v is getattr(jax.nn.initializers, name):
            return _Glob(f"jax.nn.initializers.{name}")
    for name in up.ACTIVATIONS:
        if v is getattr(jax.nn, name, None):
            return _Glob(f"jax.nn.{name}")
    if v is jnp.tanh:
        return _Glob("jax.numpy.tanh")
    raise CheckpointError(
        f"treex.save: {where}: {v!r} cannot be saved by name in a safe pickle (only kinds, float dtypes, "
        "zeros/ones initializers and jax.nn activations); use format='msgpack' or 'npz' for the leaves"
    )


def _kind(kind: Any) -> Any:
    """treex pickles name only treex kinds and ``str``; treeo's auto-annotations (``int``...) become ``NoneType``."""
    from normbridge.adapters.treex import module as kinds

    if kind is str or (isinstance(kind, type) and issubclass(kind, kinds.TreePart)):
        return kind
    return type(None)


def _plan(v: Any, where: str) -> Any:
    if isinstance(v, Module):
        cls = _SAVE_CLASS.get(type(v))
        if cls is None:
            raise CheckpointError(f"treex.save: {where}: {type(v).__name__} has no treex class to pickle as")
        state: dict[str, Any] = {}
        for k, x in vars(v).items():
            if k in ("_mutable", "_factory_fields", "_default_field_values", "_subtrees"):
                continue
            if k == "_field_metadata":
                continue
            if k == "kernel_init" and isinstance(v, Linear):
                try:
                    state[k] = _plan(x, f"{where}/{k}")
                except CheckpointError:
                    state[k] = None  # re-initialization only; the loader falls back to lecun_normal
                continue
            state[k] = _plan(x, f"{where}/{k}")
        meta = {}
        for k, m in v._field_metadata.items():
            if k in state or k in ("_training", "_frozen", "_initialized"):
                meta[k] = _Obj(
                    "treeo.types.FieldMetadata",
                    {"node": bool(m.node), "kind": _value_global(_kind(m.kind), f"{where}/{k}"), "opaque": False},
                )
        state["_field_metadata"] = meta
        return _Obj(cls, state)
    if isinstance(v, (jax.Array, np.ndarray)):
        return _Arr(v)
    if isinstance(v, list):
        return [_plan(x, f"{where}/{i}") for i, x in enumerate(v)]
    if isinstance(v, tuple):
        return tuple(_plan(x, f"{where}/{i}") for i, x in enumerate(v))
    if isinstance(v, dict):
        return {k: _plan(x, f"{where}/{k}") for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return v
    return _value_global(v, where)


class _TreexPickler(pickle._Pickler):  # the pure-Python pickler lets ``save`` be extended
    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, _Glob):
            mod, _, name = obj.qualname.rpartition(".")
            super().save(mod)
            super().save(name)
            self.write(pickle.STACK_GLOBAL)
        elif isinstance(obj, tuple) and len(obj) == 3 and obj[0] == "__call__" and isinstance(obj[1], _Glob):
            self.save(obj[1])
            self.save(obj[2])
            self.write(pickle.REDUCE)
        elif isinstance(obj, _Obj):
            self.save(_Glob(obj.qualname))
            self.write(pickle.EMPTY_TUPLE + pickle.NEWOBJ)
            self.save(obj.state)
            self.write(pickle.BUILD)
        elif isinstance(obj, _Arr):
            a = obj.array if obj.array.flags.c_contiguous else obj.array.copy(order="C")  # (keeps 0-d arrays 0-d)
            if a.dtype.kind not in "biufc":
                raise CheckpointError(f"treex.save: only numeric arrays can be saved, got {a.dtype}")
            order = "|" if a.dtype.itemsize == 1 else ("<" if a.dtype.byteorder in "<=" else ">")
            dt = (
                "__call__", _Glob("numpy.dtype"), (a.dtype.str.lstrip("<>|="), False, True)
            )  # fmt: skip
            self.save(_Glob("jax._src.array._reconstruct_array"))
            self.write(pickle.MARK)
            self.save(_Glob("numpy.core.multiarray._reconstruct"))
            self.save((_Glob("numpy.ndarray"), (0,), b"b"))
            self.write(pickle.MARK)
            super().save(1)
            super().save(tuple(a.shape))
            self.save(dt)
            self.save((3, order, None, None, None, -1, -1, 0))
            self.write(pickle.BUILD)
            super().save(False)
            super().save(a.tobytes())
            self.write(pickle.TUPLE)
            super().save({"weak_type": obj.weak, "named_shape": {}})
            self.write(pickle.TUPLE + pickle.REDUCE)
        else:
            super().save(obj, save_persistent_id)


def _msgpack_pack(state: Any) -> bytes:
    msgpack = require("msgpack", facade="treex")

    def convert(v: Any) -> Any:
        if isinstance(v, Module):
            return convert(state_dict(v))
        if isinstance(v, dict):
            return {str(k): convert(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return {str(i): convert(x) for i, x in enumerate(v)}
        if isinstance(v, (jax.Array, np.ndarray)):
            a = np.asarray(v)
            payload = msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True)
            return msgpack.ExtType(1, payload)
        return v

    return msgpack.packb(convert(state), strict_types=True)


def _flatten(tree: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            _flatten(v, f"{prefix}/{k}" if prefix else str(k), out)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _flatten(v, f"{prefix}/{i}" if prefix else str(i), out)
    elif tree is not None:
        out[prefix] = np.asarray(tree)


def dumps(module: Module, format: Format = "pickle") -> bytes:
    """The bytes :func:`save` writes."""
    if not isinstance(module, Module):
        raise TypeError(f"treex.save: expected a treex facade Module, got {type(module).__name__}")
    if format in ("pickle", "cloudpickle"):
        buf = io.BytesIO()
        _TreexPickler(buf, protocol=4 if format == "pickle" else 5).dump(_plan(module, ""))
        return buf.getvalue()
    if format == "msgpack":
        return _msgpack_pack(state_dict(module))
    if format == "npz":
        flat: dict[str, np.ndarray] = {}
        _flatten(state_dict(module), "", flat)
        buf = io.BytesIO()
        np.savez(buf, **flat)
        return buf.getvalue()
    raise ValueError(f"treex.save: unknown format {format!r}; expected pickle, cloudpickle, msgpack or npz")


def save(module: Module, path: str | os.PathLike, format: Format = "pickle") -> None:
    """Write ``module`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    data = dumps(module, format)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
