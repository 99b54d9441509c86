"""The NNX facade never calls, wraps or subclasses flax.nnx's own normalization layers (source scan)."""

from __future__ import annotations

import pathlib
import re

import normbridge

NNX_ADAPTER = pathlib.Path(normbridge.__file__).parent / "adapters" / "nnx"
LAYERS = "BatchNorm|LayerNorm|RMSNorm|GroupNorm|InstanceNorm|SpectralNorm|WeightNorm"
NATIVE = re.compile(
    rf"(?<![.\w])nnx\.({LAYERS})\b|flax\.nnx\.({LAYERS})\s*[(:)]|flax\.nnx\.nn\.normalization|nnx\.nn\.normalization"
    rf"|from\s+flax(\.nnx)?(\.nn)?\s+import[^\n]*\b({LAYERS}|normalization)\b"
)


def test_scanner_finds_native_layers() -> None:
    assert NATIVE.search("nnx.BatchNorm(4, rngs=rngs)")
    assert NATIVE.search("class X(nnx.GroupNorm):")
    assert NATIVE.search("from flax.nnx.nn import normalization")
    assert NATIVE.search("from flax.nnx import LayerNorm")
    assert NATIVE.search("y = flax.nnx.RMSNorm(4, rngs=rngs)")
    assert not NATIVE.search("normbridge.adapters.nnx.BatchNorm")


def test_no_native_normalization_layer_in_nnx_adapter() -> None:
    files = sorted(NNX_ADAPTER.rglob("*.py"))
    assert len(files) >= 5
    hits = [f"{p.name}: {m.group(0)}" for p in files for m in NATIVE.finditer(p.read_text())]
    assert not hits, hits
