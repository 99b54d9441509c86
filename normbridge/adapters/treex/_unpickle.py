"""A restricted unpickler for treex checkpoints: nothing in the file is executed.

Two layers of defence:

1. :func:`scan_globals` walks every opcode with :func:`pickletools.genops` before
   anything is built and refuses the file if it names a GLOBAL outside
   :data:`ALLOWED` (``GLOBAL``, ``STACK_GLOBAL`` with literal or memoized string
   operands, ``INST``), or uses an opcode that can reach code another way
   (``EXT1/2/4`` extension registry, ``PERSID``/``BINPERSID``, ``NEXT_BUFFER``,
   or a ``STACK_GLOBAL`` whose operands are not known strings).
2. :class:`SafeUnpickler.find_class` maps each allowed name to a *safe
   replacement*, never to the real object:

   * treex/treeo classes → inert placeholder classes that only record the
     ``BUILD`` state dict (``NEWOBJ`` with arguments is refused);
   * ``numpy.ndarray``/``numpy.dtype``/``numpy.core.multiarray._reconstruct``/
     ``numpy.core.numeric._frombuffer`` and jax's array reconstructors → functions
     that accept only numeric dtypes and raw bytes of the exact size, and build
     the array with ``numpy.frombuffer`` (numpy's own ``__setstate__`` never sees
     file data);
   * ``builtins.type`` → a function that only maps ``None`` to ``NoneType``;
   * kinds, initializers, dtypes, activations and ``builtins.str`` → non-callable
     :class:`Ref` tokens, resolved after loading from a fixed table.

   So ``REDUCE`` can only reach the vetted functions above; every other callable
   raises. Placeholders are turned into facade modules afterwards by
   :mod:`normbridge.adapters.treex.serialization`, through the public constructors.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normbridge.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError


class UnsafePickleError(UnsafeCheckpointError, pickle.UnpicklingError):
    """The pickle names a GLOBAL (or uses an opcode) outside the allow-list; nothing was built."""


# ------------------------------------------------------------------ placeholders
class Ref:
    """A named, non-callable stand-in for an allowed global used as a value (kind, dtype, initializer...)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(f"GLOBAL {self.name} may be referenced but not called while unpickling")

    def __repr__(self) -> str:
        return f"Ref({self.name})"

    def __reduce__(self) -> Any:  # never re-pickle a token
        raise TypeError("Ref tokens are not picklable")


class Placeholder:
    """Inert stand-in for a treex/treeo class: ``NEWOBJ`` with no arguments, then ``BUILD`` with a dict."""

    qualname: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        if args or kwargs:
            raise UnsafePickleError(f"{cls.qualname}: unexpected constructor arguments in the pickle")
        obj = object.__new__(cls)
        object.__setattr__(obj, "state", None)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # REDUCE calls cls(*args): __new__ already refused arguments.
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise UnsafePickleError(f"{self.qualname}: BUILD state must be a dict with str keys")
        object.__setattr__(self, "state", state)

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafePickleError(f"{self.qualname}: attribute assignment refused")

    def __repr__(self) -> str:
        return f"<pickled {self.qualname}>"


def _placeholder(qualname: str) -> type[Placeholder]:
    return type(qualname.rsplit(".", 1)[-1], (Placeholder,), {"qualname": qualname})


# ------------------------------------------------------------------ safe arrays
_NUMERIC_KINDS = "biufc"


class DTypeSpec:
    """A numeric dtype from ``numpy.dtype(spec, align, copy)`` + ``BUILD`` (byte order only)."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = False) -> None:
        if not isinstance(spec, str) or len(spec) > 8:
            raise UnsafePickleError(f"numpy.dtype: refused dtype spec {spec!r}")
        try:
            dt = np.dtype(spec)
        except TypeError as err:
            raise UnsafePickleError(f"numpy.dtype: unknown dtype spec {spec!r}") from err
        if dt.kind not in _NUMERIC_KINDS or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
            raise UnsafePickleError(f"numpy.dtype: only numeric dtypes are allowed, got {spec!r}")
        self.dtype = dt

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state: (version, byteorder, subdescr, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 2 or not isinstance(state[1], str):
            raise UnsafePickleError("numpy.dtype: malformed BUILD state")
        if any(s is not None for s in state[2:5]):
            raise UnsafePickleError("numpy.dtype: structured/sub-array dtypes are refused")
        order = state[1]
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)
        elif order not in "|=":
            raise UnsafePickleError(f"numpy.dtype: bad byte order {order!r}")


class ArraySpec:
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` + ``BUILD``: a numeric array from raw bytes."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        # ndarray state: (version, shape, dtype, is_fortran, rawdata)
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsafePickleError("numpy.ndarray: malformed BUILD state")
        _, shape, dtype, fortran, raw = state
        self.array = _array_from_bytes(raw, dtype, shape, "F" if fortran else "C", "numpy.ndarray")


def _array_from_bytes(raw: Any, dtype: Any, shape: Any, order: str, who: str) -> np.ndarray:
    if not isinstance(dtype, DTypeSpec):
        raise UnsafePickleError(f"{who}: dtype must come from numpy.dtype, got {type(dtype).__name__}")
    if not (isinstance(shape, tuple) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise UnsafePickleError(f"{who}: bad shape {shape!r}")
    if isinstance(raw, pickle.PickleBuffer):
        raw = raw.raw().tobytes()
    if not isinstance(raw, (bytes, bytearray)):
        raise UnsafePickleError(f"{who}: array data must be raw bytes, got {type(raw).__name__}")
    if order not in ("C", "F"):
        raise UnsafePickleError(f"{who}: bad order {order!r}")
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) != count * dtype.dtype.itemsize:
        raise UnsafePickleError(f"{who}: {len(raw)} bytes do not fill shape {shape} of {dtype.dtype}")
    arr = np.frombuffer(bytes(raw), dtype=dtype.dtype, count=count).reshape(shape, order=order)
    return arr.astype(arr.dtype.newbyteorder("="), copy=True)


def _np_reconstruct(cls: Any, shape: Any, typecode: Any) -> ArraySpec:
    if cls is not _NDARRAY or shape != (0,) or typecode != b"b":
        raise UnsafePickleError("numpy.core.multiarray._reconstruct: only (numpy.ndarray, (0,), b'b') is allowed")
    return ArraySpec()


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    return _array_from_bytes(buf, dtype, shape, order, "numpy.core.numeric._frombuffer")


def _jax_reconstruct(fun: Any, args: Any, arr_state: Any, aval_state: Any) -> jax.Array:
    """jax's ``_reconstruct_array``/``reconstruct_device_array``: numpy reconstruct + aval (weak_type)."""
    if fun is not _np_reconstruct or not isinstance(args, tuple):
        raise UnsafePickleError("jax array reconstruction: only numpy.core.multiarray._reconstruct is allowed")
    spec = _np_reconstruct(*args)
    spec.__setstate__(arr_state)
    weak = False
    if isinstance(aval_state, dict):
        weak = bool(aval_state.get("weak_type", False))
    assert spec.array is not None
    return to_jax(spec.array, weak)


def to_jax(arr: np.ndarray, weak_type: bool = False) -> jax.Array:
    """A jax array of ``arr``, weakly typed if asked (as ``jnp.asarray(0.99)`` is for treex's momentum)."""
    out = jnp.asarray(arr)
    if weak_type and not out.weak_type:
        out = _weak(out)
    return out


def _weak(x: jax.Array) -> jax.Array:
    """The same bits with ``weak_type=True`` (jax has no public API for this)."""
    try:
        from jax._src.lax import lax as lax_internal

        return lax_internal._convert_element_type(x, x.dtype, weak_type=True)
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - private API moved
        if x.ndim == 0 and x.dtype == jnp.float32:
            return jnp.asarray(x.item())
        return x


def _safe_type(obj: Any) -> type:
    if obj is not None:
        raise UnsafePickleError("builtins.type may only be called as type(None)")
    return type(None)


_NDARRAY = Ref("numpy.ndarray")
#: The metaclass of ``jnp.float32`` & co. (treeo's kind for an undeclared dtype field).
_SCALAR_META = type(jnp.float32)

#: Activation names a ``Lambda`` may reference (``jax.nn.<name>`` / ``jax._src.nn.functions.<name>``).
ACTIVATIONS: tuple[str, ...] = (
    "relu", "relu6", "gelu", "sigmoid", "silu", "swish", "elu", "celu", "selu", "leaky_relu", "softplus",
    "soft_sign", "log_sigmoid", "hard_tanh", "hard_sigmoid", "hard_silu", "hard_swish", "tanh", "softmax",
    "log_softmax", "glu", "mish",
)  # fmt: skip


# ---------------------------------------------------- code by value (cloudpickle)
# cloudpickle writes a function it cannot name as ``_make_function(CodeType(...), globals, name,
# argdefs, closure)`` followed by ``_function_setstate(f, (dict, slots))``, where ``slots`` holds
# ``__module__`` and ``__qualname__``. The replacements below build none of it: the code object's
# arguments are dropped, globals/closures stay inert records, and what survives is the recorded
# (module, qualname), looked up afterwards in :data:`FUNCTIONS`. A ``custom_jvp``/``PjitFunction``
# wrapper (NEWOBJ + BUILD) likewise keeps only its recorded names.


class Inert:
    """A value the file describes but normbridge never uses (a code object, a cell, a typing form...)."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(f"{self.what} may be referenced but not called while unpickling")

    def __repr__(self) -> str:
        return f"<inert {self.what}>"

    def __reduce__(self) -> Any:
        raise TypeError("inert pickle records are not picklable")


class _BuiltinTypeToken(Inert):
    """cloudpickle's ``_builtin_type(name)``: only ``CodeType`` may be 'called', and it builds nothing."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.what == "types.CodeType":
            return Inert("code object (never built)")
        raise UnsafePickleError(f"{self.what} may be referenced but not called while unpickling")


_BUILTIN_TYPES = frozenset({"CodeType", "FunctionType", "LambdaType", "CellType", "MethodType", "ModuleType"})


def _cp_builtin_type(name: Any) -> Inert:
    if not isinstance(name, str) or name not in _BUILTIN_TYPES:
        raise UnsafePickleError(f"cloudpickle._builtin_type: refused type name {name!r}")
    return _BuiltinTypeToken(f"types.{name}")


class FunctionStub:
    """A function pickled by value: only its recorded ``__module__`` and ``__qualname__`` are kept."""

    __slots__ = ("module", "qualname")

    def __init__(self) -> None:
        self.module: str | None = None
        self.qualname: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(f"function {self.label} from the pickle may not be called while unpickling")

    @property
    def label(self) -> str:
        return f"{self.module}.{self.qualname}"

    def __reduce__(self) -> Any:
        raise TypeError("function stubs are not picklable")


def _cp_make_function(code: Any, globals_: Any, name: Any, argdefs: Any, closure: Any) -> FunctionStub:
    if not (isinstance(code, Inert) and isinstance(globals_, dict)):
        raise UnsafePickleError("cloudpickle._make_function: expected (code object, globals dict, ...)")
    return FunctionStub()


def _cp_function_setstate(func: Any, state: Any) -> None:
    if not isinstance(func, FunctionStub):
        raise UnsafePickleError("cloudpickle._function_setstate: target is not a pickled function")
    if not (isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict)):
        raise UnsafePickleError("cloudpickle._function_setstate: malformed state")
    module, qualname = state[1].get("__module__"), state[1].get("__qualname__")
    if not (isinstance(module, str) and isinstance(qualname, str)):
        raise UnsafePickleError("cloudpickle._function_setstate: the function records no module/qualname")
    func.module, func.qualname = module, qualname


def _cp_make_cell(*value: Any) -> Inert:
    return Inert("closure cell")


def _cp_subimport(name: Any) -> Inert:
    if not isinstance(name, str):
        raise UnsafePickleError("cloudpickle.subimport: module name must be a str")
    return Inert(f"module {name} (not imported)")


def _inert_getitem(obj: Any, item: Any) -> Inert:
    """``operator.getitem`` as pickled for typing forms (``typing.Union[int, Any]``): an inert record."""
    if not isinstance(obj, (Ref, Inert)):
        raise UnsafePickleError("_operator.getitem may only subscript typing forms")
    return Inert("typing form")


class NamedWrapper:
    """``custom_jvp`` / ``PjitFunction`` (NEWOBJ + BUILD dict): keeps only the wrapped function's names."""

    qualname: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> NamedWrapper:
        if args or kwargs:
            raise UnsafePickleError(f"{cls.qualname}: unexpected constructor arguments in the pickle")
        obj = object.__new__(cls)
        object.__setattr__(obj, "module", None)
        object.__setattr__(obj, "name", None)
        object.__setattr__(obj, "wrapped", None)
        return obj

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise UnsafePickleError(f"{self.qualname}: BUILD state must be a dict with str keys")
        module, name = state.get("__module__"), state.get("__qualname__")
        wrapped = state.get("fun") if "fun" in state else state.get("__wrapped__")
        object.__setattr__(self, "module", module if isinstance(module, str) else None)
        object.__setattr__(self, "name", name if isinstance(name, str) else None)
        object.__setattr__(self, "wrapped", wrapped if isinstance(wrapped, (FunctionStub, NamedWrapper)) else None)

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafePickleError(f"{self.qualname}: attribute assignment refused")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(f"{self.qualname} from the pickle may not be called while unpickling")

    @property
    def label(self) -> str:
        if self.module and self.name:
            return f"{self.module}.{self.name}"
        if self.wrapped is not None:
            return self.wrapped.label
        return f"<{self.qualname} without a recorded name>"


class InertObject:
    """A jax internal object (``PjitFunctionCache``, ``UnspecifiedValue``): NEWOBJ, any BUILD, never used."""

    qualname: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        if args or kwargs:
            raise UnsafePickleError(f"{cls.qualname}: unexpected constructor arguments in the pickle")
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        pass  # already-built safe values; dropped

    def __reduce__(self) -> Any:
        raise TypeError("inert pickle records are not picklable")


class PartialSpec:
    """``functools.partial(func)`` + ``BUILD (func, args, kwargs, dict)``: rebuilt later from the table."""

    def __new__(cls, *args: Any, **kwargs: Any) -> PartialSpec:
        if len(args) != 1 or kwargs:
            raise UnsafePickleError("functools.partial: expected exactly one function argument")
        obj = object.__new__(cls)
        obj.func, obj.args, obj.kwargs = args[0], (), {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 4):
            raise UnsafePickleError("functools.partial: malformed BUILD state")
        func, args, kwargs, namespace = state
        if not isinstance(args, tuple) or not isinstance(kwargs, (dict, type(None))):
            raise UnsafePickleError("functools.partial: malformed BUILD state")
        if namespace:
            raise UnsafePickleError("functools.partial: a __dict__ in the BUILD state is refused")
        self.func, self.args, self.kwargs = func, args, dict(kwargs or {})


class InitializerMarker:
    """Stands for an initializer a loaded (initialized) module no longer needs; raises if called."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{self.name}: this initializer was stored by value in the checkpoint and is not rebuilt "
            "(normbridge never runs code from a file); the loaded module is already initialized. "
            "Pass kernel_init=... explicitly to re-initialize."
        )

    def __repr__(self) -> str:
        return f"<initializer {self.name} (from the checkpoint, not callable)>"


def _activation(name: str) -> Any:
    return jnp.tanh if name == "tanh" else getattr(jax.nn, name)


#: Functions recognised by (module, qualname) when a pickle stores them by value or wrapped:
#: activations map to the same ``jax.nn`` function; initializers to an inert marker.
FUNCTIONS: dict[str, Any] = {
    **{f"{mod}.{a}": _activation(a) for mod in ("jax._src.nn.functions", "jax.nn") for a in ACTIVATIONS},
    **{
        f"{mod}.{q}": InitializerMarker(f"{mod}.{q}")
        for mod in ("jax._src.nn.initializers", "jax.nn.initializers")
        for q in (
            "variance_scaling.<locals>.init",
            "normal.<locals>.init",
            "uniform.<locals>.init",
            "truncated_normal.<locals>.init",
            "orthogonal.<locals>.init",
            "constant.<locals>.init",
            "delta_orthogonal.<locals>.init",
        )
    },
    "flax.linen.initializers.variance_scaling.<locals>.init": InitializerMarker(
        "flax.linen.initializers.variance_scaling.<locals>.init"
    ),
}


def resolve_function(obj: FunctionStub | NamedWrapper, source: str, where: str) -> Any:
    """The safe replacement of a function the pickle recorded by name, or :class:`UnsafePickleError`."""
    label = obj.label
    if label in FUNCTIONS:
        return FUNCTIONS[label]
    raise UnsafePickleError(
        f"{source}: {where or '<root>'}: refused function {label!r} stored in the pickle "
        f"({'by value' if isinstance(obj, FunctionStub) else type(obj).__name__}): it is not in normbridge's "
        "table of functions with a safe replacement; nothing was run"
    )


# ------------------------------------------------------------------ allow-list

_CLASSES = (
    "treex.nn.norm.BatchNorm",
    "treex.nn.norm.LayerNorm",
    "treex.nn.norm.GroupNorm",
    "treex.nn.batch_norm.BatchNorm",
    "treex.nn.layer_norm.LayerNorm",
    "treex.nn.group_norm.GroupNorm",
    "treex.nn.linear.Linear",
    "treex.nn.sequential.Sequential",
    "treex.nn.sequential.Lambda",
    "treex.nn.conv.Conv",
    "treex.nn.conv.ConvTranspose",
    "treex.nn.embed.Embed",
    "treex.nn.dropout.Dropout",
    "treex.key_seq.KeySeq",
    "treex.nn.flatten.Flatten",
    "treex.nn.mlp.MLP",
    # The additions (never in treex), as normbridge's save() names them.
    "normbridge.adapters.treex.RMSNorm",
    "normbridge.adapters.treex.InstanceNorm",
    "normbridge.adapters.treex.SpectralNorm",
    "normbridge.adapters.treex.WeightNorm",
    "treeo.types.FieldMetadata",
)
PLACEHOLDERS: dict[str, type[Placeholder]] = {name: _placeholder(name) for name in _CLASSES}

_REFS = [
    "builtins.str",
    "treex.types.Parameter",
    "treex.types.BatchStat",
    "treex.types.State",
    "treex.types.ModelState",
    "treex.types.Rng",
    "treex.types.Cache",
    "treex.types.OptState",
    "treex.types.TreePart",
    "jax.numpy.float32",
    "jax.numpy.float16",
    "jax.numpy.bfloat16",
    "jax.numpy.float64",
    # Kinds treeo recorded for undeclared fields (``type(value)``).
    "builtins.int",
    "builtins.bool",
    "jax._src.numpy.lax_numpy._ScalarMeta",
    # Functions a Lambda or partial names by reference.
    "jax._src.numpy.reductions.mean",
    # Names in the globals and annotations of functions stored by value: referenced, never used.
    "typing.Any", "typing.Sequence", "typing.Tuple", "typing.Union",
    "jax._src.core.NamedShape", "jax._src.prng.PRNGKeyArray",
    "jax._src.nn.initializers._complex_truncated_normal", "jax._src.nn.initializers._complex_uniform",
    "jax._src.custom_derivatives._sum_tangents", "jax._src.custom_derivatives._zeros_like_pytree",
    "jax._src.pjit._device_assignment_mismatch_error", "jax._src.pjit._get_arg_names",
    "jax._src.pjit._get_fastpath_data", "jax._src.pjit._pjit_lower", "jax._src.pjit._python_pjit_helper",
    "jax._src.pjit._read_most_recent_pjit_call_executable", "jax._src.pjit._resolve_in_shardings",
    "jax._src.traceback_util.UnfilteredStackTrace", "jax._src.traceback_util._add_call_stack_frames",
    "jax._src.traceback_util._add_tracebackhide_to_hidden_frames", "jax._src.traceback_util._filtering_mode",
    "jax._src.traceback_util._is_under_reraiser", "jax._src.traceback_util.filter_traceback",
    "jax._src.traceback_util.format_exception_only",
    "jax._src.tree_util.tree_flatten", "jax._src.tree_util.tree_map", "jax._src.tree_util.treedef_tuple",
    "jaxlib.utils.safe_zip",
]  # fmt: skip
for _mod in ("jax.nn.initializers", "jax._src.nn.initializers"):
    _REFS += [f"{_mod}.zeros", f"{_mod}.ones"]
for _mod in ("jax.nn", "jax._src.nn.functions", "jax.numpy", "jax._src.numpy.ufuncs"):
    _REFS += [f"{_mod}.{a}" for a in ACTIVATIONS]

ALLOWED: dict[str, Any] = {
    **PLACEHOLDERS,
    **{name: Ref(name) for name in _REFS},
    "builtins.type": _safe_type,
    "numpy.ndarray": _NDARRAY,
    "numpy.dtype": DTypeSpec,
    "numpy.core.multiarray._reconstruct": _np_reconstruct,
    "numpy._core.multiarray._reconstruct": _np_reconstruct,
    "numpy.core.numeric._frombuffer": _np_frombuffer,
    "numpy._core.numeric._frombuffer": _np_frombuffer,
    "jax._src.array._reconstruct_array": _jax_reconstruct,
    "jax._src.device_array.reconstruct_device_array": _jax_reconstruct,
    # cloudpickle's code-by-value machinery: inert replacements (see above).
    "cloudpickle.cloudpickle._make_function": _cp_make_function,
    "cloudpickle.cloudpickle._builtin_type": _cp_builtin_type,
    "cloudpickle.cloudpickle._make_empty_cell": _cp_make_cell,
    "cloudpickle.cloudpickle._make_cell": _cp_make_cell,
    "cloudpickle.cloudpickle.subimport": _cp_subimport,
    "cloudpickle.cloudpickle_fast._function_setstate": _cp_function_setstate,
    "_operator.getitem": _inert_getitem,
    "functools.partial": PartialSpec,
    "jax._src.custom_derivatives.custom_jvp": type("custom_jvp", (NamedWrapper,), {"qualname": "custom_jvp"}),
    "jaxlib.xla_extension.PjitFunction": type("PjitFunction", (NamedWrapper,), {"qualname": "PjitFunction"}),
    "jaxlib.xla_extension.PjitFunctionCache": type(
        "PjitFunctionCache", (InertObject,), {"qualname": "jaxlib.xla_extension.PjitFunctionCache"}
    ),
    "jax._src.sharding_impls.UnspecifiedValue": type(
        "UnspecifiedValue", (InertObject,), {"qualname": "jax._src.sharding_impls.UnspecifiedValue"}
    ),
}


def resolve_ref(ref: Ref) -> Any:
    """The real object an allowed value-global stands for (looked up in a fixed table, never imported by name)."""
    name = ref.name
    mod, _, attr = name.rpartition(".")
    if name == "builtins.str":
        return str
    if mod == "treex.types":
        from normbridge.adapters.treex import module as kinds

        return getattr(kinds, attr)
    if name in ("builtins.int", "builtins.bool"):
        return int if attr == "int" else bool
    if name == "jax._src.numpy.lax_numpy._ScalarMeta":
        return _SCALAR_META
    if name == "jax._src.numpy.reductions.mean":
        return jnp.mean
    if mod == "jax.numpy" and attr in ("float32", "float16", "bfloat16", "float64"):
        return getattr(jnp, attr)
    if mod in ("jax.nn.initializers", "jax._src.nn.initializers") and attr in ("zeros", "ones"):
        return getattr(jax.nn.initializers, attr)
    if attr in ACTIVATIONS:
        return jnp.tanh if attr == "tanh" else getattr(jax.nn, attr)
    return Inert(name)  # referenced by a function stored by value; never used


# ------------------------------------------------------------------ pre-scan
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_NEUTRAL_OPS = {"PROTO", "FRAME", "STOP"}
_FORBIDDEN_OPS = {"EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID", "NEXT_BUFFER", "READONLY_BUFFER"}
_UNKNOWN = object()


def _opcodes(data: bytes, source: str) -> Iterator[tuple[Any, Any, Any]]:
    """``pickletools.genops``, with a damaged stream reported as :class:`CorruptCheckpointError`.

    Opcodes are yielded as they are read, so a refused GLOBAL before the damage is still
    reported by name (unsafe wins over corrupt: nothing is built either way).
    """
    ops = pickletools.genops(data)
    while True:
        try:
            item = next(ops)
        except StopIteration:
            return
        except Exception as err:  # pickletools raises ValueError, and others on garbage
            raise CorruptCheckpointError(
                f"{source}: damaged pickle: expected a complete pickle stream ending with STOP, "
                f"found {type(err).__name__}: {err} ({len(data)} bytes; truncated?)"
            ) from err
        yield item


def scan_globals(data: bytes, source: str = "<bytes>") -> list[str]:
    """Every GLOBAL the pickle names, in order; raise :class:`UnsafePickleError` on anything outside the allow-list.

    Runs before any object is built. ``STACK_GLOBAL`` operands are tracked
    through the memo; operands that are not known strings are refused.
    """
    names: list[str] = []
    memo: dict[int, Any] = {}
    last: list[Any] = []  # values pushed by the most recent opcodes (strings or _UNKNOWN)
    for op, arg, _pos in _opcodes(data, source):
        name = op.name
        if name in _FORBIDDEN_OPS:
            raise UnsafePickleError(f"{source}: opcode {name} is not allowed in a treex checkpoint")
        if name in ("GLOBAL", "INST"):
            qual = str(arg).replace(" ", ".", 1)
            _check(qual, source)
            names.append(qual)
            last.append(_UNKNOWN)
        elif name == "STACK_GLOBAL":
            if len(last) < 2 or not all(isinstance(v, str) for v in last[-2:]):
                raise UnsafePickleError(f"{source}: STACK_GLOBAL with operands that are not literal strings")
            qual = f"{last[-2]}.{last[-1]}"
            _check(qual, source)
            names.append(qual)
            last = [*last[:-2], _UNKNOWN]
        elif name in _STRING_OPS:
            last.append(arg)
        elif name in _GET_OPS:
            last.append(memo.get(arg, _UNKNOWN))
        elif name == "MEMOIZE":
            memo[len(memo)] = last[-1] if last else _UNKNOWN
        elif name in _PUT_OPS:
            memo[arg] = last[-1] if last else _UNKNOWN
        elif name not in _NEUTRAL_OPS:
            last.append(_UNKNOWN)
        if len(last) > 4:
            last = last[-4:]
    return names


def _check(qual: str, source: str) -> None:
    if qual not in ALLOWED:
        raise UnsafePickleError(
            f"{source}: refused pickle GLOBAL {qual!r}: not on the treex allow-list "
            "(unpickling would import or call it); nothing was loaded"
        )


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only returns the safe replacements in :data:`ALLOWED`."""

    def __init__(self, file: io.BytesIO, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        qual = f"{module}.{name}"
        _check(qual, self.source)
        return ALLOWED[qual]

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: persistent ids are not allowed")


def safe_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Scan, then unpickle ``data`` with :class:`SafeUnpickler`; returns placeholders, arrays and Refs."""
    scan_globals(data, source)
    try:
        return SafeUnpickler(io.BytesIO(data), source).load()
    except CheckpointError:
        raise
    except Exception as err:
        # The stream parsed; building it failed (a malformed argument, an inconsistent memo...).
        raise CorruptCheckpointError(
            f"{source}: damaged pickle: expected the objects of a treex checkpoint, found a stream that "
            f"fails to unpickle ({type(err).__name__}: {err})"
        ) from err
