"""Every misuse with a native counterpart raises what the native layer raises, in all four facades.

One table: each row runs the same misuse on the native layer (``flax.linen``, ``flax.nnx``,
``equinox.nn``; for treex, ``flax.linen`` configured the way treex configured flax) and on the
facade. The native error is captured when the test runs (never written down here), and the
facade's must be of the same type with the native message **verbatim** inside it (the facade may
add the layer name, a path or the values around it). A row whose native message is a jax-internal
message (not one the library wrote) and that the facade cannot reproduce without re-deriving jax's
text is marked ``type_only`` with the reason.

The audit behind the table: every ``raise`` in ``normbridge/adapters/{linen,nnx,equinox,treex}``
norm layers (and the core helpers they call) that has a native counterpart has a row; raises
without one (treex's own lazy-init state, the equinox-style ``InstanceNorm`` which equinox lacks,
the treex wrappers' "not a treex Module") are listed in :data:`NO_NATIVE_COUNTERPART`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import normbridge.adapters.equinox as NE
import normbridge.adapters.linen as NL
import normbridge.adapters.nnx as NN
import normbridge.adapters.treex as TX
from normbridge.adapters.treex.module import initializing


@dataclasses.dataclass(frozen=True)
class Misuse:
    facade: str
    name: str
    native: Callable[[], Any]
    mine: Callable[[], Any]
    #: why only the type can match (the native message is jax's, not the library's); ``""`` = verbatim.
    type_only: str = ""


ROWS: list[Misuse] = []


def row(facade: str, name: str, run: Callable[[Any], Any] | None = None, *, native: Callable[[], Any] | None = None,
        mine: Callable[[], Any] | None = None, type_only: str = "") -> None:
    """A misuse written once as ``run(namespace)``, or as two callables when the calls differ."""
    namespaces = {"linen": (nn, NL), "nnx": (nnx, NN), "equinox": (eqx.nn, NE)}
    if run is not None:
        nat_ns, fac_ns = namespaces[facade]
        native, mine = (lambda: run(nat_ns)), (lambda: run(fac_ns))
    assert native is not None and mine is not None
    ROWS.append(Misuse(facade, name, native, mine, type_only))


KEY = jax.random.key(0)
X3 = jnp.ones((2, 3, 4), jnp.float32)
X6 = jnp.ones((2, 3, 6), jnp.float32)

# ------------------------------------------------------------------------------------------------ linen
row("linen", "BatchNorm use_running_average in neither", lambda ns: ns.BatchNorm().init(KEY, X3))
row("linen", "BatchNorm use_running_average in ctor and call",
    lambda ns: ns.BatchNorm(use_running_average=True).init(KEY, X3, use_running_average=False))
row("linen", "BatchNorm train without mutable batch_stats", lambda ns: ns.BatchNorm().apply(
    ns.BatchNorm().init(KEY, X3, use_running_average=True), X3, use_running_average=False))
row("linen", "BatchNorm axis out of range", lambda ns: ns.BatchNorm(use_running_average=False, axis=5).init(KEY, X3))
row("linen", "GroupNorm num_groups=None and group_size=None", lambda ns: ns.GroupNorm(None).init(KEY, X6))
row("linen", "GroupNorm num_groups and group_size", lambda ns: ns.GroupNorm(2, 3).init(KEY, X6))
row("linen", "GroupNorm num_groups does not divide C", lambda ns: ns.GroupNorm(4).init(KEY, X6))
row("linen", "GroupNorm default num_groups=32 on 6 channels", lambda ns: ns.GroupNorm().init(KEY, X6))
row("linen", "GroupNorm num_groups=0", lambda ns: ns.GroupNorm(0).init(KEY, X6))
row("linen", "GroupNorm num_groups not an int", lambda ns: ns.GroupNorm(2.0).init(KEY, X6))
row("linen", "GroupNorm group_size does not divide C", lambda ns: ns.GroupNorm(None, 4).init(KEY, X6))
row("linen", "GroupNorm reduction_axes without the last axis",
    lambda ns: ns.GroupNorm(2, reduction_axes=(1,)).init(KEY, X6))
row("linen", "GroupNorm mask that fits no way", lambda ns: ns.GroupNorm(2).init(KEY, X6, mask=jnp.ones((3, 3), bool)))
row("linen", "InstanceNorm feature_axes=0 (issue example)",
    lambda ns: ns.InstanceNorm(feature_axes=0).init(KEY, jnp.ones((2, 3, 4, 5))))
row("linen", "InstanceNorm feature_axes=-3 is axis 0", lambda ns: ns.InstanceNorm(feature_axes=-3).init(KEY, X3))
row("linen", "InstanceNorm on a 1-D input", lambda ns: ns.InstanceNorm().init(KEY, jnp.ones((6,))))
row("linen", "LayerNorm integer dtype", lambda ns: ns.LayerNorm(dtype=jnp.int32).init(KEY, X3))
row("linen", "LayerNorm mask of wrong shape", lambda ns: ns.LayerNorm().init(KEY, X3, mask=jnp.ones((3, 3), bool)))
row("linen", "RMSNorm mask of wrong shape", lambda ns: ns.RMSNorm().init(KEY, X3, mask=jnp.ones((3, 3), bool)))
row("linen", "SpectralNorm DenseGeneral((3, 4)) kernel with error_on_non_matrix (issue example)",
    lambda ns: ns.SpectralNorm(nn.DenseGeneral((3, 4)), error_on_non_matrix=True).init(KEY, X3, update_stats=False))
row("linen", "SpectralNorm conv kernel with error_on_non_matrix", lambda ns: ns.SpectralNorm(
    nn.Conv(3, (2, 2)), error_on_non_matrix=True).init(KEY, jnp.ones((1, 4, 4, 2)), update_stats=False))
row("linen", "SpectralNorm update_stats missing", lambda ns: ns.SpectralNorm(nn.Dense(3)).init(KEY, X3))
row("linen", "SpectralNorm update_stats without mutable", lambda ns: ns.SpectralNorm(nn.Dense(3)).apply(
    ns.SpectralNorm(nn.Dense(3)).init(KEY, X3, update_stats=False), X3, update_stats=True))
row("linen", "WeightNorm feature_axes out of range",
    lambda ns: ns.WeightNorm(nn.Dense(3), feature_axes=5).init(KEY, X3))

# -------------------------------------------------------------------------------------------------- nnx
R = nnx.Rngs


def _changed_after_init(ns: Any, layer: str) -> Any:
    """A wrapper whose wrapped layer gained a kernel after construction (nnx: "should not change")."""
    m = getattr(ns, layer)(nnx.Linear(3, 4, rngs=R(0)), rngs=R(1))
    m.layer_instance.extra = nnx.Linear(3, 4, rngs=R(2))  # a new ('extra', 'kernel') Param
    x = jnp.ones((2, 3))
    return m(x, update_stats=True) if layer == "SpectralNorm" else m(x)


row("nnx", "BatchNorm use_running_average=None and no call flag",
    lambda ns: ns.BatchNorm(3, use_running_average=None, rngs=R(0))(jnp.ones((2, 3))))
row("nnx", "BatchNorm axis out of range", lambda ns: ns.BatchNorm(6, axis=5, rngs=R(0))(X6))
row("nnx", "GroupNorm num_groups=None and group_size=None", lambda ns: ns.GroupNorm(6, None, rngs=R(0)))
row("nnx", "GroupNorm num_groups and group_size", lambda ns: ns.GroupNorm(6, 2, 3, rngs=R(0)))
row("nnx", "GroupNorm num_groups does not divide C", lambda ns: ns.GroupNorm(6, 4, rngs=R(0)))
row("nnx", "GroupNorm default num_groups=32 on 6 features", lambda ns: ns.GroupNorm(6, rngs=R(0)))
row("nnx", "GroupNorm num_groups=0", lambda ns: ns.GroupNorm(6, 0, rngs=R(0)))
row("nnx", "GroupNorm num_groups not an int", lambda ns: ns.GroupNorm(6, 2.0, rngs=R(0)))
row("nnx", "GroupNorm group_size does not divide C", lambda ns: ns.GroupNorm(6, None, 4, rngs=R(0)))
row("nnx", "InstanceNorm feature_axes=0", lambda ns: ns.InstanceNorm(2, feature_axes=0, rngs=R(0))(jnp.ones((2, 3))))
row("nnx", "LayerNorm integer dtype", lambda ns: ns.LayerNorm(6, dtype=jnp.int32, rngs=R(0))(X6))
row("nnx", "LayerNorm num_features does not fit the input", lambda ns: ns.LayerNorm(5, rngs=R(0))(X6))
row("nnx", "SpectralNorm conv kernel with error_on_non_matrix",
    lambda ns: ns.SpectralNorm(nnx.Conv(2, 3, (3, 3), rngs=R(0)), error_on_non_matrix=True, rngs=R(1)))
row("nnx", "SpectralNorm layer_instance gained a parameter", lambda ns: _changed_after_init(ns, "SpectralNorm"))
row("nnx", "WeightNorm layer_instance gained a parameter", lambda ns: _changed_after_init(ns, "WeightNorm"))

# ---------------------------------------------------------------------------------------------- equinox
LIN = eqx.nn.Linear(3, 4, key=jax.random.key(0))


def _bn(ns: Any, mode: str, x: jax.Array, *, vmap: bool = True) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bn, state = eqx.nn.make_with_state(ns.BatchNorm)(3, "b", mode=mode)
    if not vmap:
        return bn(x, state)
    return jax.vmap(bn, axis_name="b", in_axes=(0, None), out_axes=(0, None))(x, state)


_BN_TYPE_ONLY = ("equinox has no check: it fails inside the statistics update with jax's broadcasting message "
                 "(operand order differs by mode); the facade raises the same TypeError saying which input is wrong")

row("equinox", "LayerNorm input shape != shape", lambda ns: ns.LayerNorm(3)(jnp.ones((2, 3))))
row("equinox", "RMSNorm input shape != shape", lambda ns: ns.RMSNorm(3)(jnp.ones((2, 3))))
row("equinox", "GroupNorm groups do not divide channels", lambda ns: ns.GroupNorm(4, 6))
row("equinox", "GroupNorm channels missing with channelwise_affine", lambda ns: ns.GroupNorm(4))
row("equinox", "GroupNorm input channels not divisible by groups", lambda ns: ns.GroupNorm(2, 4)(jnp.ones((5, 3))))
row("equinox", "GroupNorm (no affine) input channels not divisible by groups",
    lambda ns: ns.GroupNorm(2, None, channelwise_affine=False)(jnp.ones((5, 3))))
row("equinox", "GroupNorm input channels != channels", lambda ns: ns.GroupNorm(2, 4)(jnp.ones((6, 3))))
row("equinox", "GroupNorm 0-d input", lambda ns: ns.GroupNorm(2, 4)(jnp.ones(())))
row("equinox", "BatchNorm invalid mode", lambda ns: ns.BatchNorm(3, "b", mode="bogus"))
row("equinox", "BatchNorm outside vmap (unbound axis name)", lambda ns: _bn(ns, "batch", jnp.ones((3, 2)), vmap=False))
row("equinox", "BatchNorm 0-d example", lambda ns: _bn(ns, "batch", jnp.ones((4,))))
row("equinox", "BatchNorm wrong number of channels (mode=ema)", lambda ns: _bn(ns, "ema", jnp.ones((4, 5, 2))),
    type_only=_BN_TYPE_ONLY)
row("equinox", "BatchNorm wrong number of channels (mode=batch)", lambda ns: _bn(ns, "batch", jnp.ones((4, 5, 2))),
    type_only=_BN_TYPE_ONLY)
row("equinox", "SpectralNorm 1-D weight", lambda ns: ns.SpectralNorm(LIN, "bias", key=jax.random.key(1)))
row("equinox", "SpectralNorm missing weight attribute", lambda ns: ns.SpectralNorm(LIN, "nope", key=jax.random.key(1)))
row("equinox", "WeightNorm axis out of range (positive)", lambda ns: ns.WeightNorm(LIN, axis=5))
row("equinox", "WeightNorm axis out of range (negative)", lambda ns: ns.WeightNorm(LIN, axis=-3))
row("equinox", "WeightNorm missing weight attribute", lambda ns: ns.WeightNorm(LIN, "nope"))


# ------------------------------------------------------------------------------------------------ treex
# Reference: flax.linen configured as treex configured flax (epsilon 1e-5, dtype float32).
def _linen_ref(cls: Any, x: jax.Array, **kw: Any) -> Any:
    return cls(**{"epsilon": 1e-5, "dtype": jnp.float32, **kw}).init(KEY, x)


class Kernel3(TX.Module):
    """A treex module with a 3-D ``kernel`` (``x @ kernel`` over the first axis), for SpectralNorm."""

    kernel: jax.Array | None = TX.Parameter.node()

    def __init__(self) -> None:
        self._set_name()
        self.kernel = None

    def __call__(self, x: jax.Array) -> jax.Array:
        if initializing():
            self.kernel = jnp.ones((x.shape[-1], 3, 4))
        return jnp.einsum("ni,ijk->njk", x, self.kernel)


row("treex", "GroupNorm num_groups does not divide C", native=lambda: _linen_ref(nn.GroupNorm, X6, num_groups=4),
    mine=lambda: TX.GroupNorm(num_groups=4).init(0, X6))
row("treex", "GroupNorm default num_groups=32 on 6 channels", native=lambda: _linen_ref(nn.GroupNorm, X6),
    mine=lambda: TX.GroupNorm().init(0, X6))
row("treex", "GroupNorm num_groups=None and group_size=None",
    native=lambda: _linen_ref(nn.GroupNorm, X6, num_groups=None),
    mine=lambda: TX.GroupNorm(num_groups=None).init(0, X6))
row("treex", "GroupNorm num_groups and group_size",
    native=lambda: _linen_ref(nn.GroupNorm, X6, num_groups=2, group_size=3),
    mine=lambda: TX.GroupNorm(num_groups=2, group_size=3).init(0, X6))
row("treex", "GroupNorm group_size does not divide C",
    native=lambda: _linen_ref(nn.GroupNorm, X6, num_groups=None, group_size=4),
    mine=lambda: TX.GroupNorm(num_groups=None, group_size=4).init(0, X6))
row("treex", "GroupNorm num_groups=0", native=lambda: _linen_ref(nn.GroupNorm, X6, num_groups=0),
    mine=lambda: TX.GroupNorm(num_groups=0).init(0, X6))
row("treex", "InstanceNorm on a 1-D input", native=lambda: _linen_ref(nn.InstanceNorm, jnp.ones((6,))),
    mine=lambda: TX.InstanceNorm().init(0, jnp.ones((6,))))
_REQUIRED = {"BatchNorm": {"use_running_average": False}, "LayerNorm": {}, "GroupNorm": {"num_groups": 2}}
for _layer, _kw in _REQUIRED.items():
    row("treex", f"{_layer} integer dtype",
        native=lambda _layer=_layer, _kw=_kw: _linen_ref(getattr(nn, _layer), X6, **{**_kw, "dtype": jnp.int32}),
        mine=lambda _layer=_layer: getattr(TX, _layer)(dtype=jnp.int32))
row("treex", "SpectralNorm 3-D kernel with error_on_non_matrix",
    native=lambda: nn.SpectralNorm(nn.DenseGeneral((3, 4)), error_on_non_matrix=True).init(
        KEY, jnp.ones((2, 5)), update_stats=False),
    mine=lambda: TX.SpectralNorm(Kernel3(), error_on_non_matrix=True).init(0, jnp.ones((2, 5))))

#: ``raise`` statements of the facades with no native counterpart (audited, no row possible).
NO_NATIVE_COUNTERPART = {
    "equinox InstanceNorm (channels not a positive int; x not (channels, ...))": "equinox has no InstanceNorm",
    "treex BatchNorm mean/var None; SpectralNorm/WeightNorm wrapped layer has no kernel": "treex lazy-init state",
    "treex BatchNorm input feature shape != stored statistics": "linen does not check batch_stats shapes",
    "treex GroupNorm input of rank < 2": "linen accepts rank 1 (normalizes the groups of one vector)",
    "treex SpectralNorm/WeightNorm layer is not a treex Module": "the linen wrappers take linen modules",
    "nnx GroupNorm reduction_axes without the last axis": "listed deviation: nnx does not check (linen's check)",
    "nnx SpectralNorm no update_stats": "unreachable in nnx and the facade alike (native text kept verbatim)",
    "treex dtype that is not a dtype at all (TypeError)": "linen only fails later, inside jnp.asarray",
}


def _raised(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except Exception as err:  # measured, not expected: whatever native raises is the reference
        return err
    return None


@pytest.mark.parametrize("misuse", ROWS, ids=[f"{m.facade}: {m.name}" for m in ROWS])
def test_facade_raises_the_native_error(misuse: Misuse) -> None:
    native = _raised(misuse.native)
    assert native is not None, "the native layer did not raise: not a misuse"
    facade = _raised(misuse.mine)
    assert facade is not None, f"facade did not raise; native raised {type(native).__name__}: {native}"
    # same type (or a subclass: every ``except NativeType`` still catches it)
    assert isinstance(facade, type(native)), f"native {type(native).__name__} vs facade {type(facade).__name__}"
    assert type(facade) is type(native) or type(facade).__mro__[1] is type(native)
    if not misuse.type_only:
        assert str(native) in str(facade), f"native message not verbatim in the facade's:\n{native!s}\n{facade!s}"


def test_table_covers_every_facade() -> None:
    counts = Counter(m.facade for m in ROWS)
    # the numbers reported for issue 11; a row removed by accident fails here
    assert counts == {"linen": 24, "nnx": 15, "equinox": 18, "treex": 11}, counts
    assert len({(m.facade, m.name) for m in ROWS}) == len(ROWS)
