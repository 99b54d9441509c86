"""Bad input: same exception type as native nnx, messages naming the layer and the argument; import guard."""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import pytest
from flax import nnx

import normbridge.adapters.nnx as F


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((6,), {}), ((6, None, None), {}), ((6, 4), {}), ((6, None, 4), {}), ((6, 0), {})],
)
def test_group_norm_bad_groups_raise_value_error_like_native(args, kwargs) -> None:
    with pytest.raises(ValueError):
        nnx.GroupNorm(*args, **kwargs, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"GroupNorm\(num_features=6\)"):
        F.GroupNorm(*args, **kwargs, rngs=nnx.Rngs(0))


def test_batch_norm_without_flag_names_the_argument() -> None:
    x = jnp.ones((2, 3))
    for cls in (nnx.BatchNorm, F.BatchNorm):
        with pytest.raises(ValueError, match="use_running_average"):
            cls(3, use_running_average=None, rngs=nnx.Rngs(0))(x)


def test_instance_norm_batch_axis_feature_raises() -> None:
    x = jnp.ones((2, 3))
    for cls in (nnx.InstanceNorm, F.InstanceNorm):
        with pytest.raises(ValueError, match="leading"):
            cls(2, feature_axes=(0,), rngs=nnx.Rngs(0))(x)


def test_spectral_norm_non_matrix_raises_naming_the_parameter() -> None:
    conv = lambda: nnx.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0))  # noqa: E731
    with pytest.raises(ValueError):
        nnx.SpectralNorm(conv(), error_on_non_matrix=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="SpectralNorm: parameter 'kernel': Layer instance parameter is 4D"):
        F.SpectralNorm(conv(), error_on_non_matrix=True, rngs=nnx.Rngs(0))


def test_from_canonical_wrong_kind() -> None:
    rec = F.to_canonical(F.LayerNorm(4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"from_canonical\(BatchNorm\): record kind 'layer_norm'"):
        F.from_canonical(rec, F.BatchNorm(4, rngs=nnx.Rngs(0)))


def test_missing_flax_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['flax'] = None\n"
        "try:\n    import normbridge.adapters.nnx\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "pip install 'normbridge[nnx]'" in out, out
