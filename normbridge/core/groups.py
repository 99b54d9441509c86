"""Group splitting: channels are cut into contiguous blocks ``[0:C/G], [C/G:2C/G], ...``."""

from __future__ import annotations

import jax


def resolve_groups(
    channels: int, num_groups: int | None, group_size: int | None, *, channels_word: str = "channels"
) -> tuple[int, int]:
    """``(num_groups, group_size)`` from exactly one of them; ``ValueError`` otherwise.

    The messages are flax's, so a facade raises what the native layer raises; linen says
    "Number of channels (C) is not multiple of the group size", nnx says "Number of
    features": ``channels_word`` picks the word.
    """
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            "Either `num_groups` or `group_size` should be specified. If `group_size` is to be "
            "specified, pass `num_groups=None` as argument to override the default `num_groups` value of 32."
        )
    if group_size is not None:
        if channels % group_size != 0:
            raise ValueError(
                f"Number of {channels_word} ({channels}) is not multiple of the group size ({group_size})."
            )
        return channels // group_size, group_size
    assert num_groups is not None
    if num_groups <= 0 or channels % num_groups != 0:
        raise ValueError(f"Number of groups ({num_groups}) does not divide the number of channels ({channels}).")
    return num_groups, channels // num_groups


def split_groups(x: jax.Array, num_groups: int, *, channels_first: bool = False) -> jax.Array:
    """Reshape the channel axis into ``(num_groups, group_size)``.

    channels-last ``(..., C)`` → ``(..., G, C/G)``; channels-first ``(C, ...)`` → ``(G, C/G, ...)``.
    """
    if channels_first:
        c = x.shape[0]
        return x.reshape(num_groups, c // num_groups, *x.shape[1:])
    c = x.shape[-1]
    return x.reshape(*x.shape[:-1], num_groups, c // num_groups)


def merge_groups(x: jax.Array, *, channels_first: bool = False) -> jax.Array:
    """Inverse of :func:`split_groups`."""
    if channels_first:
        return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
