"""Whole-model conversion between linen, NNX, Equinox and treex (native layers or facades).

Hub and spoke: each framework's spoke (:mod:`~normbridge.conversion.linen`, ``.nnx``, ``.equinox``,
``.treex``) lists a model's layers with their canonical records (norm layers through the adapters'
``to_canonical``/``from_canonical``, everything else through :mod:`normbridge.core.layouts`), records
the order in which the layers are called, and writes records into a copy of ``like``. The engine
(:mod:`~normbridge.conversion.engine`) pairs, writes and verifies. Public API:

* :func:`convert` (also ``normbridge.convert``): ``(target, ConversionReport)``;
* :func:`pair`: the pairing alone, a list of :class:`Pair` (what ``normbridge.testing`` builds on).
"""

from normbridge.conversion.engine import CROSS_RTOL, convert, framework_of, pair
from normbridge.conversion.report import ConversionReport, Pair, Verification

__all__ = ["CROSS_RTOL", "ConversionReport", "Pair", "Verification", "convert", "framework_of", "pair"]
