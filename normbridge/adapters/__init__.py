"""Framework facades. Each subpackage imports its framework lazily through
:func:`normbridge._optional.require`, so ``normbridge.core`` works with ``jax`` alone."""
