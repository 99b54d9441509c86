"""cloudpickles that store functions by value load without building a code object or calling anything.

The real-treex model fixtures' cloudpickles carry Python 3.9 code objects (flax's initializer closures,
jax's jit-wrapped relu). The loader keeps only each function's recorded module and qualified name and
maps it through an explicit table; these tests make every way of building code fail and still load,
refuse unknown functions by name, and feed hostile payloads through each new GLOBAL.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import pickle
import sys
import types

import cloudpickle
import jax
import numpy as np
import pytest

from normbridge import errors
from normbridge.adapters import treex as tx
from normbridge.adapters.treex import _unpickle as up
from normbridge.conformance import treex_fixtures as tf

FOLDER = tf.fixtures_dir(name="treex-models")
CODE_FILES = sorted(fl["file"] for fx in tf.manifest(FOLDER) for fl in fx["files"] if fl.get("holds_code_by_value"))

# An audit hook cannot be removed; it only acts while a test switches it on.
_AUDIT = {"on": False, "seen": []}
_CODE_EVENTS = {"code.__new__", "marshal.loads", "exec", "compile", "function.__new__"}


def _importing() -> bool:
    """Whether the import system is running (loading an installed module's .pyc is not the file's code)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _audit(event: str, args: tuple) -> None:
    if _AUDIT["on"] and event in _CODE_EVENTS and not _importing():
        _AUDIT["seen"].append(event)
        raise RuntimeError(f"code construction during a treex load: {event}")


sys.addaudithook(_audit)


class _Refuse:
    def __init__(self, what: str) -> None:
        self.what = what

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"{self.what} was called while loading")


class _RefusingType(type):
    """A stand-in for ``types.CodeType``/``FunctionType``: ``isinstance`` still works, construction fails."""

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, cls.real)

    def __subclasscheck__(cls, sub) -> bool:
        return issubclass(sub, cls.real)

    def __call__(cls, *args, **kwargs):
        raise AssertionError(f"types.{cls.__name__} was constructed while loading")


def _refusing(real: type) -> type:
    return _RefusingType(real.__name__, (), {"real": real})


@pytest.fixture
def no_code(monkeypatch: pytest.MonkeyPatch):
    """types.CodeType/FunctionType and every cloudpickle constructor fail; code-building audit events raise."""
    import cloudpickle.cloudpickle as cp
    import cloudpickle.cloudpickle_fast as cpf

    monkeypatch.setattr(types, "CodeType", _refusing(types.CodeType))
    monkeypatch.setattr(types, "FunctionType", _refusing(types.FunctionType))
    monkeypatch.setattr(types, "LambdaType", _refusing(types.LambdaType))
    for mod, names in ((cp, ("_make_function", "_builtin_type", "_make_cell", "_make_empty_cell", "subimport",
                             "_make_skeleton_class")), (cpf, ("_function_setstate",))):  # fmt: skip
        for name in names:
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, _Refuse(f"{mod.__name__}.{name}"))
    _AUDIT["seen"].clear()
    yield _code_forbidden


@contextlib.contextmanager
def _code_forbidden():
    """Audit events that build code raise inside this block (kept narrow: pytest compiles when reporting)."""
    _AUDIT["on"] = True
    try:
        yield
    finally:
        _AUDIT["on"] = False


def test_audit_hook_catches_code_construction(no_code) -> None:
    """Positive control: with the hook on, building a code object really fails."""
    with pytest.raises(RuntimeError, match="code construction"), no_code():
        compile("1", "<x>", "eval")
    assert "compile" in _AUDIT["seen"]
    with pytest.raises(AssertionError, match="constructed while loading"):
        types.FunctionType((lambda: 0).__code__, {})
    assert isinstance(len, types.BuiltinFunctionType) and isinstance(_audit, types.FunctionType)


def test_real_cloudpickle_would_build_code() -> None:
    """Positive control: plain cloudpickle.loads of a by-value function builds a code object."""
    seen: list[str] = []
    _AUDIT["seen"].clear()

    def f(x):
        return x + 1

    data = cloudpickle.dumps(f)
    with pytest.raises(RuntimeError, match="code construction"), _code_forbidden():
        pickle.loads(data)
    seen = list(_AUDIT["seen"])
    assert "code.__new__" in seen


@pytest.mark.parametrize("name", CODE_FILES)
def test_code_by_value_fixture_loads_with_code_construction_disabled(name: str, no_code) -> None:
    assert len(CODE_FILES) == 6  # cnn train/eval-saved and mlp, jax and numpy leaves
    with no_code():
        module = tx.load(FOLDER / name)
    assert _AUDIT["seen"] == []
    assert isinstance(module, tx.Sequential)
    fns = [layer.f for layer in module.layers if isinstance(layer, tx.Lambda)]
    mlps = [layer for layer in module.layers if isinstance(layer, tx.MLP)]
    assert jax.nn.relu in fns + [m.activation for m in mlps]  # the by-value relu, resolved by name
    inits = [layer.kernel_init for layer in module.layers if isinstance(layer, (tx.Conv, tx.Linear))]
    assert inits and all(isinstance(i, up.InitializerMarker) for i in inits)


def _patched(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and data.count(old) >= 1
    return data.replace(old, new)


def test_unknown_function_refused_by_name(tmp_path: pathlib.Path) -> None:
    """A by-value function whose recorded name is not in the table is refused with module, name and file."""
    data = (FOLDER / "mlp_flatten_ln.cloudpickle.pkl").read_bytes()
    bad = _patched(data, b"variance_scaling.<locals>.init", b"variance_scalinX.<locals>.init")
    path = tmp_path / "unknown_fn.cloudpickle.pkl"
    path.write_bytes(bad)
    with pytest.raises(tx.UnsafePickleError) as err:
        tx.load(path)
    msg = str(err.value)
    assert "'jax._src.nn.initializers.variance_scalinX.<locals>.init'" in msg and str(path) in msg
    assert isinstance(err.value, errors.UnsafeCheckpointError)


def test_unknown_custom_jvp_refused_by_name(tmp_path: pathlib.Path) -> None:
    data = (FOLDER / "cnn_mnist_trainsaved.cloudpickle.pkl").read_bytes()
    bad = _patched(data, b"jax._src.nn.functions", b"jax._src.nn.functionX")
    path = tmp_path / "unknown_jvp.pkl"
    path.write_bytes(bad)
    with pytest.raises(tx.UnsafePickleError, match=r"refused function 'jax\._src\.nn\.functionX\.relu'"):
        tx.load(path)


def _fake_treex_lambda(monkeypatch: pytest.MonkeyPatch):
    """A class pickled as ``treex.nn.sequential.Lambda`` (real treex's layout: NEWOBJ + BUILD of __dict__)."""
    mods = {}
    for name in ("treex", "treex.nn", "treex.nn.sequential"):
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])

    class Lambda:
        pass

    Lambda.__module__, Lambda.__qualname__ = "treex.nn.sequential", "Lambda"
    mods["treex.nn.sequential"].Lambda = Lambda
    return Lambda


def _evil_function(target: pathlib.Path, module: str, qualname: str):
    def evil(x, _t=str(target)):
        os.mkdir(_t)
        return x

    evil.__module__, evil.__qualname__ = module, qualname
    return evil


def test_hostile_code_under_a_known_name_is_never_run(tmp_path: pathlib.Path, monkeypatch) -> None:
    """A by-value function that claims to be relu is replaced by jax.nn.relu: its code is never built or run."""
    target = tmp_path / "pwned"
    Lambda = _fake_treex_lambda(monkeypatch)
    obj = Lambda()
    obj.__dict__.update(f=_evil_function(target, "jax._src.nn.functions", "relu"), name="lambda",
                        _training=True, _frozen=False, _initialized=True)  # fmt: skip
    data = cloudpickle.dumps(obj, protocol=5)
    control = pickle.loads(data)  # positive control: the payload is live under plain unpickling
    control.f(1)
    assert target.is_dir()
    os.rmdir(target)
    monkeypatch.delitem(sys.modules, "treex.nn.sequential")
    loaded = tx.load(io.BytesIO(data))
    assert isinstance(loaded, tx.Lambda) and loaded.f is jax.nn.relu
    np.testing.assert_array_equal(loaded(np.array([-1.0, 2.0])), [0.0, 2.0])
    assert not target.exists()


def test_hostile_code_under_an_unknown_name_is_refused(tmp_path: pathlib.Path, monkeypatch) -> None:
    target = tmp_path / "pwned"
    Lambda = _fake_treex_lambda(monkeypatch)
    obj = Lambda()
    obj.__dict__.update(f=_evil_function(target, "posix", "system"), name="lambda")
    data = cloudpickle.dumps(obj, protocol=5)
    with pytest.raises(tx.UnsafePickleError, match=r"refused function 'posix\.system'"):
        tx.load(io.BytesIO(data))
    assert not target.exists()


# ------------------------------------------------------------ hostile new GLOBALs
def _global(qual: str) -> bytes:
    mod, _, name = qual.rpartition(".")
    return pickle.GLOBAL + f"{mod}\n{name}\n".encode()


def _args(*args) -> bytes:
    return pickle.dumps(args, protocol=2)[2:-1]  # no PROTO/STOP; str/int/None only: no GLOBAL


NEW_GLOBALS = sorted({n for fx in tf.manifest(FOLDER) for fl in fx["files"]
                      for n in fl.get("globals_beyond_existing_allowlist", [])})  # fmt: skip


@pytest.mark.parametrize("qual", NEW_GLOBALS)
def test_lookalike_of_a_new_global_is_refused(tmp_path: pathlib.Path, qual: str) -> None:
    """The allowed name under another module (``os.<name>``, ``<module>X.<name>``) is refused before building."""
    mod, _, name = qual.rpartition(".")
    for fake in (f"os.{name}", f"{mod}X.{name}", f"{mod}.{name}X"):
        data = pickle.PROTO + b"\x02" + _global(fake) + _args("x") + pickle.REDUCE + pickle.STOP
        with pytest.raises(tx.UnsafePickleError, match=f"GLOBAL '{fake}'"):
            tx.load(io.BytesIO(data))


HOSTILE_REDUCE = [
    ("treex.nn.conv.Conv", ("rm -rf /",), "unexpected constructor arguments"),
    ("treex.key_seq.KeySeq", (1,), "unexpected constructor arguments"),
    ("treex.nn.dropout.Dropout", ("x",), "unexpected constructor arguments"),
    ("treex.nn.mlp.MLP", ("x",), "unexpected constructor arguments"),
    ("treex.nn.flatten.Flatten", ("x",), "unexpected constructor arguments"),
    ("functools.partial", ("posix.system", "ls"), "exactly one function"),
    ("cloudpickle.cloudpickle._builtin_type", ("__import__",), "refused type name"),
    ("cloudpickle.cloudpickle._make_function", ("code", {}, "f", None, None), "expected \\(code object"),
    ("cloudpickle.cloudpickle_fast._function_setstate", ("f", ({}, {})), "not a pickled function"),
    ("cloudpickle.cloudpickle.subimport", (1,), "module name must be a str"),
    ("_operator.getitem", ({"a": 1}, "a"), "only subscript typing forms"),
    ("jax._src.custom_derivatives.custom_jvp", ("posix.system",), "unexpected constructor arguments"),
    ("jaxlib.xla_extension.PjitFunction", ("x",), "unexpected constructor arguments"),
    ("jaxlib.xla_extension.PjitFunctionCache", ("x",), "unexpected constructor arguments"),
    ("jax._src.sharding_impls.UnspecifiedValue", ("x",), "unexpected constructor arguments"),
    ("jax._src.pjit._python_pjit_helper", ("x",), "may be referenced but not called"),
    ("jax._src.traceback_util.filter_traceback", ("x",), "may be referenced but not called"),
    ("typing.Union", ("x",), "may be referenced but not called"),
    ("jax._src.numpy.reductions.mean", ("x",), "may be referenced but not called"),
    ("builtins.int", ("12",), "may be referenced but not called"),
    ("jax._src.prng.PRNGKeyArray", ("x",), "may be referenced but not called"),
]


@pytest.mark.parametrize(("qual", "args", "match"), HOSTILE_REDUCE, ids=[h[0] for h in HOSTILE_REDUCE])
def test_reduce_of_an_allowed_global_with_hostile_arguments_is_refused(qual: str, args: tuple, match: str) -> None:
    data = pickle.PROTO + b"\x02" + _global(qual) + _args(*args) + pickle.REDUCE + pickle.STOP
    with pytest.raises(tx.UnsafePickleError, match=match):
        tx.load(io.BytesIO(data), format="pickle")


def test_builtin_code_type_builds_nothing_and_subimport_imports_nothing() -> None:
    """``_builtin_type('CodeType')(...)`` gives an inert record; ``subimport(name)`` does not import."""
    assert "antigravity" not in sys.modules
    data = (pickle.PROTO + b"\x02" + _global("cloudpickle.cloudpickle._builtin_type") + _args("CodeType")
            + pickle.REDUCE + _args(0, 0, 0, 0, 0, 0, "print(1)") + pickle.REDUCE + pickle.POP
            + _global("cloudpickle.cloudpickle.subimport") + _args("antigravity") + pickle.REDUCE
            + pickle.STOP)  # fmt: skip
    out = up.safe_loads(data)
    assert isinstance(out, up.Inert) and "antigravity" not in sys.modules


def test_partial_state_with_a_namespace_is_refused() -> None:
    data = (pickle.PROTO + b"\x02" + _global("functools.partial") + pickle.MARK + _global("jax.nn.relu")
            + pickle.TUPLE + pickle.REDUCE + pickle.MARK + _global("jax.nn.relu") + pickle.EMPTY_TUPLE
            + pickle.EMPTY_DICT + pickle.EMPTY_DICT + pickle.SHORT_BINUNICODE + b"\x01a" + pickle.NONE
            + pickle.SETITEM + pickle.TUPLE + pickle.BUILD + pickle.STOP)  # fmt: skip
    with pytest.raises(tx.UnsafePickleError, match="__dict__ in the BUILD state"):
        up.safe_loads(data)


def test_manifest_lists_what_the_loader_reads() -> None:
    """Each file's recorded GLOBALs are exactly what the pre-scan finds in it."""
    for fx in tf.manifest(FOLDER):
        for fl in fx["files"]:
            if "pickle_globals" in fl:
                found = up.scan_globals((FOLDER / fl["file"]).read_bytes(), fl["file"])
                assert set(found) == set(fl["pickle_globals"]), fl["file"]
    assert json  # (manifest read through tf)
