"""``normbridge check`` rows for the NNX facade: a fixed grid of facade-vs-``flax.nnx`` measurements.

One row per layer (every cell measured on the grid below with the functions of
:mod:`normbridge.conformance.nnx_cases`), plus one row per deliberate deviation from an
nnx 0.12.8 bug, where the cell shows the native quirk next to the facade matching linen.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from normbridge.adapters import nnx as facade
from normbridge.conformance import Cell, Row, measured
from normbridge.conformance.measure import tree_diff
from normbridge.conformance.nnx_cases import (
    Check,
    NormCase,
    WrapperCase,
    accumulate,
    build_norm,
    build_wrapper,
    groupnorm_deviation,
    mask_deviation,
    measure_norm,
    measure_wrapper,
    mode_checks,
    randomize_params,
    signature_checks,
    state_diff,
    wrapper_deviation,
)

BF16 = jnp.bfloat16

#: The fixed grid: a few shapes, dtypes and flags per layer; jit on most to keep the check fast.
GRID: dict[str, list[Any]] = {
    "BatchNorm": [
        NormCase("BatchNorm", (4, 6), steps=3),
        NormCase("BatchNorm", (2, 3, 4), dtype="bfloat16", mask=True, use_jit=True, steps=5),
        NormCase(
            "BatchNorm", (2, 3, 4), kwargs=(("axis", 1), ("use_fast_variance", False), ("dtype", BF16)), use_jit=True
        ),
    ],
    "LayerNorm": [
        NormCase("LayerNorm", (2, 6)),
        NormCase("LayerNorm", (2, 3, 4), kwargs=(("reduction_axes", (1, 2)), ("feature_axes", (1, 2))), use_jit=True),
        NormCase("LayerNorm", (2, 3, 4), dtype="float16", kwargs=(("use_bias", False),), mask=True, use_jit=True),
    ],
    "RMSNorm": [
        NormCase("RMSNorm", (2, 6)),
        NormCase("RMSNorm", (2, 3, 4), dtype="bfloat16", mask=True, use_jit=True),
    ],
    "GroupNorm": [
        NormCase("GroupNorm", (2, 6), kwargs=(("num_groups", 3),)),
        NormCase(
            "GroupNorm",
            (2, 3, 4, 6),
            dtype="bfloat16",
            kwargs=(("num_groups", None), ("group_size", 2)),
            mask=True,
            use_jit=True,
        ),
    ],
    "InstanceNorm": [
        NormCase("InstanceNorm", (2, 3, 6)),
        NormCase("InstanceNorm", (2, 3, 4, 6), dtype="float16", use_jit=True),
    ],
    "SpectralNorm": [
        WrapperCase("SpectralNorm", steps=3),
        WrapperCase("SpectralNorm", inner="Tensor3", kwargs=(("n_steps", 2),)),
    ],
    "WeightNorm": [
        WrapperCase("WeightNorm"),
        WrapperCase("WeightNorm", inner="Tensor3", kwargs=(("feature_axes", None),), use_jit=True),
    ],
}


def _evidence() -> str:
    return f"flax.nnx {importlib.metadata.version('flax')} (same init key, inputs and parameters)"


def _record_arrays(layer: Any) -> dict[str, Any]:
    return facade.to_canonical(layer).arrays()


def checkpoint_checks(case: Any) -> list[Check]:
    """Canonical round trips (facade and native, bit-exact), cross loads native ⇄ facade, native state → facade."""
    is_norm = isinstance(case, NormCase)

    def build(cls_name: str, which: Any, seed: int) -> Any:
        cls = getattr(which, cls_name)
        if is_norm:
            return build_norm(cls, case, rngs_seed=seed)
        return build_wrapper(cls, case if seed == case.seed else WrapperCase(**{**case.__dict__, "seed": seed}))

    checks: list[Check] = []
    src = {"native": build(case.layer, nnx, case.seed), "facade": build(case.layer, facade, case.seed)}
    randomize_params(list(src.values()), jax.random.key(case.seed + 3))
    for name, m in src.items():
        for target_name, which in (("native", nnx), ("facade", facade)):
            dst = build(case.layer, which, case.seed + 17)
            facade.from_canonical(facade.to_canonical(m), dst)
            rec_a, rec_b = _record_arrays(m), _record_arrays(dst)
            checks.append(
                Check(
                    "checkpoint round trip", f"{case.layer} record {name}→{target_name}", tree_diff(rec_a, rec_b), True
                )
            )
    # A native nnx state (pure dict, as restored from a checkpoint) loads into the facade.
    dst = build(case.layer, facade, case.seed + 17)
    facade.load_native_state(dst, nnx.to_pure_dict(nnx.state(src["native"])))
    checks.append(
        Check("checkpoint round trip", f"{case.layer} native state → facade", state_diff(src["native"], dst), True)
    )
    return checks


def _layer_row(layer: str) -> Row:
    cells: dict[str, Cell] = {}
    checks: list[Check] = []

    def collect(fn: Callable[[], list[Check]]) -> None:
        def run() -> Cell:
            checks.extend(fn())
            return Cell(True, "ran")

        cell = measured(run)
        if not cell.ok:  # a crash is a failed measurement of this row
            checks.append(Check("outputs", "crash", False, detail=cell.text))

    collect(lambda: signature_checks(layer))
    for case in GRID[layer]:
        collect(lambda case=case: measure_norm(case) if isinstance(case, NormCase) else measure_wrapper(case))
    collect(lambda: checkpoint_checks(GRID[layer][0]))
    collect(lambda: mode_checks(layer))
    cells.update(accumulate(checks))
    notes = {
        "BatchNorm": "nnx's dtype=None promotion includes the f32 running stats (output ≥ f32), reproduced.",
        "SpectralNorm": "Native kernel reset to the raw value before each native call (see the kernel-overwrite row).",
        "WeightNorm": "Gains compared by value; their Variable type is a deviation (see its row).",
    }.get(layer, "")
    return Row("nnx", layer, cells, evidence=_evidence(), notes=notes)


def _deviation_cell(column: str, quirk: list[Check], follows: list[Check]) -> Cell:
    q = [c for c in quirk if c.column == column]
    f = [c for c in follows if c.column == column]
    shown = sum(c.ok() for c in q)
    follow_cell = accumulate(f).get(column, Cell(False, "no case ran"))
    ok = follow_cell.ok and shown == len(q)
    native = f"native quirk shown {shown}/{len(q)}; " if q else ""
    return Cell(ok, f"{native}facade = linen: {follow_cell.text}", deviation=True)


def _deviation_row(layer: str, fn: Callable[[], tuple[list[Check], list[Check]]], notes: str) -> Row:
    result: dict[str, Any] = {}

    def run() -> Cell:
        result["q"], result["f"] = fn()
        return Cell(True, "ran")

    crash = measured(run)
    if not crash.ok:
        return Row("nnx", layer, {"outputs": Cell(False, crash.text, deviation=True)}, _evidence(), notes)
    columns = sorted({c.column for c in result["q"] + result["f"]})
    cells = {col: _deviation_cell(col, result["q"], result["f"]) for col in columns}
    return Row("nnx", layer, cells, evidence=_evidence() + " and flax.linen", notes=notes)


def rows() -> list[Row]:
    out = [_layer_row(layer) for layer in GRID]
    out.append(
        _deviation_row(
            "GroupNorm (axis-1 broadcast bug)",
            groupnorm_deviation,
            "nnx 0.12.8 repeats the group statistics along axis 1 instead of the last axis: it crashes on 1-D "
            "input and on reduction_axes=(0,1,2), and is wrong for reduction_axes=(2,3) (layouts §0.14); it also "
            "does not check that reduction_axes include the last axis. The facade repeats along -1 and validates "
            "like flax.linen GroupNorm.",
        )
    )
    out.append(
        _deviation_row(
            "SpectralNorm (kernel overwrite, google/flax#5576)",
            lambda: wrapper_deviation("SpectralNorm"),
            "nnx 0.12.8 writes W/σ back into the wrapped layer's kernel on every call (google/flax#5576), so "
            "calls renormalize an already-normalized kernel and nnx.grad/Optimizer update the normalized kernel. "
            "The facade uses W/σ only for the wrapped call and keeps the raw kernel, reproducing flax.linen "
            "SpectralNorm apply (outputs, u, gradients).",
        )
    )
    out.append(
        _deviation_row(
            "WeightNorm (kernel overwrite / scales not Param)",
            lambda: wrapper_deviation("WeightNorm"),
            "nnx 0.12.8 overwrites the wrapped kernel on every call (google/flax#5576) and stores the gains as "
            "plain arrays (not nnx.Param: never trained, param_dtype ignored, random scale_init crashes). The "
            "facade keeps the raw kernel and makes the gains nnx.Param in param_dtype, reproducing flax.linen "
            "WeightNorm (outputs and gradients including the gains). Native checkpoints still load "
            "(load_native_state).",
        )
    )
    out.append(
        _deviation_row(
            "masks (0/1 float mask)",
            mask_deviation,
            "nnx 0.12.8 passes mask to jnp.mean(where=) without casting, so a 0/1 float mask raises ValueError "
            "(layouts §0.16); the docstrings say 'binary array'. The facade casts the mask to bool as flax.linen "
            "does; with a bool mask facade and native are bitwise equal.",
        )
    )
    return out
