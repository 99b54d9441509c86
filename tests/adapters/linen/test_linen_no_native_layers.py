"""No facade may call, wrap or subclass a framework's own normalization layer (scan of the source text)."""

from __future__ import annotations

import pathlib
import re

import normbridge

ADAPTERS = pathlib.Path(normbridge.__file__).parent / "adapters"
LAYERS = "BatchNorm|LayerNorm|RMSNorm|GroupNorm|InstanceNorm|SpectralNorm|WeightNorm"
# Anywhere in normbridge/adapters: linen's layers or its normalization module.
EVERYWHERE = re.compile(
    rf"flax\.linen\.normalization|(?<!adapters\.)linen\.({LAYERS})\b"
    rf"|from\s+flax\.linen(\.\w+)?\s+import[^\n]*\b({LAYERS})\b"
)
# In the linen facade, where ``nn`` is flax.linen: no ``nn.BatchNorm`` etc.
IN_LINEN = re.compile(rf"\bnn\.({LAYERS})\b")


def test_scanner_finds_native_layers() -> None:
    assert EVERYWHERE.search("import flax.linen.normalization")
    assert EVERYWHERE.search("x = flax.linen.BatchNorm()")
    assert EVERYWHERE.search("from flax.linen import Dense, LayerNorm")
    assert IN_LINEN.search("nn.GroupNorm(2)")
    assert not IN_LINEN.search("nnx.GroupNorm(2)")
    assert not EVERYWHERE.search("normbridge.adapters.linen.BatchNorm")


def test_no_native_normalization_layer_in_adapters() -> None:
    files = sorted(ADAPTERS.rglob("*.py"))
    assert any(p.parent.name == "linen" for p in files)
    hits = [f"{p}: {m.group(0)}" for p in files for m in EVERYWHERE.finditer(p.read_text())]
    hits += [f"{p}: {m.group(0)}" for p in (ADAPTERS / "linen").rglob("*.py") for m in IN_LINEN.finditer(p.read_text())]
    assert not hits, hits
