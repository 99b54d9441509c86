"""Rows of the compatibility matrix for the equinox facade, measured against the installed ``equinox.nn``.

Each row runs the measuring functions of :mod:`normbridge.conformance.equinox_measure`
over a small fixed grid (shapes, dtypes float32/bfloat16/float16, modes, jit or
eager); the pytest suite drives the same functions with hypothesis.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable

from normbridge.conformance import COLUMNS, Cell, Row, measured
from normbridge.conformance import equinox_measure as em


def _evidence(extra: str = "") -> str:
    try:
        version = importlib.metadata.version("equinox")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        version = "?"
    return f"equinox.nn {version}{extra}"


def _row(layer: str, run: Callable[[em.Accs], None], evidence: str, notes: str = "") -> Row:
    accs = em.new_accs()
    failure = measured(lambda: (run(accs), Cell(True, ""))[1])
    cells = {}
    for col in COLUMNS:
        acc = accs[col]
        cells[col] = failure if not failure.ok else Cell(acc.ok, acc.text())
    return Row("equinox", layer, cells, evidence=evidence, notes=notes)


def _batch_norm(accs: em.Accs) -> None:
    em.measure_signature(em.eqx.nn.BatchNorm, em.nb.BatchNorm, accs["signature"])
    grid = [
        em.BNConfig(mode="ema", dtype="float32", steps=5),
        em.BNConfig(mode="batch", dtype="float32", steps=5, use_jit=True, spatial=(2, 3)),
        em.BNConfig(mode="batch", dtype="bfloat16", steps=5),
        em.BNConfig(mode="ema", dtype="float16", state_dtype="float16", steps=5, channelwise_affine=False, spatial=()),
        # native raises TypeError (lax.select dtype mismatch): the facade must raise it too
        em.BNConfig(mode="ema", dtype="bfloat16", steps=1),
    ]
    for cfg in grid:
        em.measure_batch_norm(cfg, accs)
    em.measure_batch_norm_pmap(accs, mode="batch")
    em.measure_batch_norm_pmap(accs, mode="ema")


def _norm(layer: str, shapes: list[tuple[int, ...]]) -> Callable[[em.Accs], None]:
    def run(accs: em.Accs) -> None:
        if layer == "InstanceNorm":
            sig = list(inspect.signature(em.nb.InstanceNorm.__init__).parameters)
            accs["signature"].check("InstanceNorm.__init__", sig == ["self", "channels", "eps", "channelwise_affine",
                                                                     "dtype"], str(sig))
            call = list(inspect.signature(em.nb.InstanceNorm.__call__).parameters)
            accs["signature"].check("InstanceNorm.__call__", call == ["self", "x", "state", "key"], str(call))
        else:
            em.measure_signature(getattr(em.eqx.nn, layer), getattr(em.nb, layer), accs["signature"])
        # one configuration per dtype, alternating shapes, flags and jit
        for i, dtype in enumerate(["float32", "bfloat16", "float16"]):
            em.measure_norm(
                em.NormConfig(layer=layer, shape=shapes[i % len(shapes)], dtype=dtype, use_jit=i == 1,
                              use_bias=i != 2, use_weight=layer != "RMSNorm" or i != 1, seed=i),
                accs,
            )

    return run


def _spectral(accs: em.Accs) -> None:
    em.measure_signature(em.eqx.nn.SpectralNorm, em.nb.SpectralNorm, accs["signature"])
    em.measure_spectral_norm(em.WrapConfig(layer="Linear", steps=5, dtype="bfloat16"), accs)
    em.measure_spectral_norm(em.WrapConfig(layer="Conv2d", num_power_iterations=2, use_jit=True), accs)


def _weight(accs: em.Accs) -> None:
    em.measure_signature(em.eqx.nn.WeightNorm, em.nb.WeightNorm, accs["signature"])
    em.measure_weight_norm(em.WrapConfig(layer="Linear", axis=1, dtype="bfloat16"), accs)
    em.measure_weight_norm(em.WrapConfig(layer="Conv2d", axis=None, use_jit=True), accs)


def rows() -> list[Row]:
    """One row per equinox layer (+ InstanceNorm against ``vmap(eqx.nn.GroupNorm(C, C))``)."""
    return [
        _row("BatchNorm", _batch_norm, _evidence(", modes ema/batch, vmap + pmap×vmap ('dev','batch')"),
             "bf16 input with f32 state in mode='ema' raises TypeError as natively. Deviation by design: under "
             "jax.pmap mode='ema' works (native raises ValueError from State.set), measured against a single vmap. "
             "The max rel in outputs and train/eval semantics is pmap×vmap vs one flat vmap over the same batch "
             "(another reduction order); facade vs native is bitwise everywhere."),
        _row("LayerNorm", _norm("LayerNorm", [(5,), (4, 3)]), _evidence()),
        _row("RMSNorm", _norm("RMSNorm", [(5,), (2, 3, 2)]), _evidence()),
        _row("GroupNorm", _norm("GroupNorm", [(4, 3), (4, 2, 2)]), _evidence()),
        _row("InstanceNorm", _norm("InstanceNorm", [(4, 3), (2, 2, 2)]),
             _evidence(": vmap(eqx.nn.GroupNorm(C, C)) (equinox has no InstanceNorm)"),
             "Beyond native; signature in equinox style (channels, eps, channelwise_affine, dtype)."),
        _row("SpectralNorm", _spectral, _evidence(", Linear and Conv2d")),
        _row("WeightNorm", _weight, _evidence(", Linear and Conv2d, axis 0/1/None")),
    ]
