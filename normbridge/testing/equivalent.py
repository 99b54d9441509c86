"""``assert_equivalent``: two models compute the same thing — values, layers, outputs, gradients, training.

Checks, in order; the first check that fails is reported in full (every mismatching leaf, in the user's
paths of both models) and the later ones are not run, because a difference found early explains the
ones after it:

1. **models**: every paired parameter and statistic, plus (linen) every layer replayed on the same
   inputs — a layer that holds the same values and receives the same input but computes something else
   (a different eps, a different formula) is named by its path;
2. **eval outputs** on each batch;
3. **gradients** of ``loss`` (default: mean square of the output) of the eval computation with respect
   to the input and every parameter;
4. for ``train_steps > 0``, each step of the same optax optimizer (default ``optax.sgd(1e-2)``) on the
   batches in turn: training-mode outputs, gradients, then parameters and statistics after the update,
   then eval outputs.

Parameters are paired by :mod:`normbridge.testing.pairing` (same structure: by path, with ``mapping``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normbridge.testing._compare import LeafDiff, compare_leaf, tree_paths
from normbridge.testing._models import Functional, functional
from normbridge.testing.pairing import LeafPair, pairing_for
from normbridge.testing.report import DiffReport, _tolerance_text


@dataclasses.dataclass(frozen=True)
class EquivalenceReport:
    """What :func:`assert_equivalent` checked: one :class:`DiffReport` per check, in order."""

    checks: tuple[DiffReport, ...]
    not_run: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(self.checks)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def failed(self) -> DiffReport | None:
        return next((c for c in self.checks if not c), None)

    @property
    def failing_paths(self) -> tuple[str, ...]:
        """The paths (of model ``a``) the first failing check names."""
        return () if self.failed is None else self.failed.failing_paths

    def render(self, style: str = "plain") -> str:
        lines = []
        for c in self.checks:
            lines.append(c.render(style) if not c else f"ok: {c.summary()}")
        if self.not_run:
            lines.append("not run (an earlier check failed): " + ", ".join(self.not_run))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render("auto")


def _mean_square(y: Any) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(y)
    return sum(jnp.mean(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves)


class _Checker:
    def __init__(self, pairs: list[LeafPair], names: tuple[str, str], rtol, atol) -> None:
        self.pairs = pairs
        self.names = names
        self.rtol, self.atol = rtol, atol
        self.tolerance = _tolerance_text(rtol, atol, None)
        self.by_a = {p.path_a: p for p in pairs}

    def leaves(
        self,
        title: str,
        la: dict[str, Any],
        lb: dict[str, Any],
        paired: bool,
        prefix: str = "",
        tree_scale: bool | float = False,
    ) -> DiffReport:
        """Compare two ``{path: leaf}`` dicts; ``paired``: through the parameter pairing (b's paths differ);
        ``prefix`` is put before every reported path (``grad ``, ``after step ``)."""
        out: list[LeafDiff] = []
        only_a, only_b = [], []
        scale = tree_scale if not isinstance(tree_scale, bool) else (_tree_scale(lb) if tree_scale else None)
        if paired:
            seen_b = set()
            for pa, va in la.items():
                pair = self.by_a.get(pa)
                if pair is None or pair.path_b not in lb:
                    only_a.append(prefix + pa)
                    continue
                seen_b.add(pair.path_b)
                vb = lb[pair.path_b] if pair.to_a is None else pair.to_a(lb[pair.path_b])
                out.append(
                    compare_leaf(
                        prefix + pa, va, vb, rtol=self.rtol, atol=self.atol, path_b=prefix + pair.path_b, scale=scale
                    )
                )
            only_b = [prefix + pb for pb in lb if pb not in seen_b]
        else:
            for pa, va in la.items():
                if pa in lb:
                    out.append(compare_leaf(pa, va, lb[pa], rtol=self.rtol, atol=self.atol, scale=scale))
                else:
                    only_a.append(pa)
            only_b = [pb for pb in lb if pb not in la]
        return DiffReport(tuple(out), tuple(sorted(only_a)), tuple(sorted(only_b)), self.names, self.tolerance, title)


def _merge(title: str, parts: Sequence[DiffReport]) -> DiffReport:
    first = parts[0]
    return dataclasses.replace(
        first,
        title=title,
        leaves=tuple(leaf for p in parts for leaf in p.leaves),
        only_a=tuple(q for p in parts for q in p.only_a),
        only_b=tuple(q for p in parts for q in p.only_b),
    )


def _tree_scale(leaves: dict[str, Any]) -> float:
    """Largest finite magnitude over all leaves (0 when none)."""
    best = 0.0
    for v in leaves.values():
        x = np.abs(np.asarray(v, dtype=np.float64)) if np.asarray(v).dtype.kind in "fcV" else None
        if x is not None and x.size:
            finite = x[np.isfinite(x)]
            if finite.size:
                best = max(best, float(finite.max()))
    return best


def _outputs(prefix: str, y: Any) -> dict[str, Any]:
    return {f"{prefix}/{k}" if k else prefix: v for k, v in tree_paths(y).items()}


# -- linen layer replay ----------------------------------------------------------------------------------
def _linen_layer_replay(
    fa: Functional, fb: Functional, model_a: Any, model_b: Any, x: Any, checker: _Checker
) -> list[LeafDiff]:
    """Run every layer of ``b`` on the inputs the same layer of ``a`` received; the innermost layers whose
    outputs differ (same structure: layers paired by path and call order)."""
    import flax.linen as nn

    from normbridge.testing._models import _linen_flags

    module_a, module_b = model_a[0], model_b[0]
    calls: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def record(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        if ctx.method_name == "__call__":
            calls["/".join(ctx.module.path)].append((args, kwargs, out))
        return out

    with nn.intercept_methods(record):
        module_a.apply({"params": fa.params, **fa.state}, x, **_linen_flags(module_a, False))

    diffs: dict[str, LeafDiff] = {}
    order: list[str] = []

    def replay(next_fun, args, kwargs, ctx):
        path = "/".join(ctx.module.path)
        if ctx.method_name != "__call__" or not calls[path]:
            return next_fun(*args, **kwargs)
        a_args, a_kwargs, a_out = calls[path].popleft()
        try:
            out = next_fun(*a_args, **a_kwargs)
        except Exception as err:  # this layer of b cannot run on a's input: named, a's output passed on
            diffs.setdefault(path or "(model)", _error_leaf(path or "(model)", err))
            return a_out
        d = _first_bad(path or "(model)", a_out, out, checker)
        if d is not None and path not in diffs:
            diffs[path] = d
            order.append(path)
        return out

    # a failure outside any layer call: the models' check reports its cause
    with nn.intercept_methods(replay), contextlib.suppress(Exception):
        module_b.apply({"params": fb.params, **fb.state}, x, **_linen_flags(module_b, False))
    # innermost only: a layer whose sub-layer already differs adds nothing
    bad = [p for p in diffs if not any(q != p and (p == "" or q.startswith(p + "/")) for q in diffs)]
    return [diffs[p] for p in bad]


def _error_leaf(path: str, err: Exception) -> LeafDiff:
    text = f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"
    return LeafDiff(path, (), (), "", "", 1, 1, False, text_a="runs", text_b=text)


def _first_bad(path: str, a_out: Any, b_out: Any, checker: _Checker) -> LeafDiff | None:
    outs_a, outs_b = tree_paths(a_out), tree_paths(b_out)
    if set(outs_a) != set(outs_b):
        return LeafDiff(path, (), (), "", "", 1, 1, False, text_a="output structure differs")
    worst = None
    for k in outs_a:
        d = compare_leaf(f"{path}/{k}" if k else path, outs_a[k], outs_b[k], rtol=checker.rtol, atol=checker.atol)
        if not d.ok and (worst is None or d.norm_rel > worst.norm_rel):
            worst = d
    return worst


# -- the check ---------------------------------------------------------------------------------------------
def _batches(inputs: Any) -> list[Any]:
    return list(inputs) if isinstance(inputs, list) else [inputs]


def _split(batch: Any) -> tuple[Any, Any]:
    """``(x_for_a, x_for_b)``: a pair of arrays when the two models take different layouts, else one array."""
    if isinstance(batch, tuple) and len(batch) == 2 and all(hasattr(x, "shape") for x in batch):
        return batch
    return batch, batch


def _layout_perm(xa: Any, xb: Any) -> tuple[int, ...] | None:
    """The axis permutation that turns ``a``'s input into ``b``'s (e.g. NHWC -> NCHW), None if the same."""
    if not (hasattr(xa, "shape") and hasattr(xb, "shape")) or xa is xb or np.shape(xa) == np.shape(xb):
        return None
    xa, xb = np.asarray(xa), np.asarray(xb)
    for perm in itertools.permutations(range(xa.ndim)):
        if np.transpose(xa, perm).shape == xb.shape and np.array_equal(np.transpose(xa, perm), xb):
            return perm
    raise ValueError(f"assert_equivalent: the inputs for a {xa.shape} and b {xb.shape} are not one array's layouts")


def _to_a_layout(g: Any, perm: tuple[int, ...] | None) -> Any:
    return g if perm is None else jnp.transpose(g, np.argsort(perm))


def assert_equivalent(
    a: Any,
    b: Any,
    inputs: Any,
    *,
    mapping: Mapping[str, str] | None = None,
    train_steps: int = 0,
    optimizer: Any = None,
    loss: Callable[[Any], Any] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> EquivalenceReport:
    """Assert that models ``a`` and ``b`` compute the same thing; raise ``AssertionError`` naming every
    mismatching leaf of the first check that fails (see the module doc for the checks), in both models'
    paths. ``b`` is the reference for tolerances.

    ``a``, ``b``: a linen ``(module, variables)``, an NNX module, an Equinox model or ``(model, state)``,
    a treex module (native or facade layers), or a :class:`~normbridge.testing.Functional`.
    ``inputs``: one batch or a list of batches (one per training step, reused cyclically).
    ``mapping``: ``{path_in_a: path_in_b}`` (exact paths or path prefixes) for parameters named differently.
    ``loss(y)``: scalar training loss of an output (default: mean square). ``optimizer``: an optax
    ``GradientTransformation`` (default ``optax.sgd(1e-2)``). ``rtol``/``atol``: as :func:`tree_diff`.
    Returns the :class:`EquivalenceReport` when the models are equivalent.
    """
    __tracebackhide__ = True
    report = check_equivalent(
        a, b, inputs, mapping=mapping, train_steps=train_steps, optimizer=optimizer, loss=loss, rtol=rtol, atol=atol
    )
    if not report:
        raise AssertionError(report.render("plain"))
    return report


def check_equivalent(
    a: Any,
    b: Any,
    inputs: Any,
    *,
    mapping: Mapping[str, str] | None = None,
    train_steps: int = 0,
    optimizer: Any = None,
    loss: Callable[[Any], Any] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> EquivalenceReport:
    """:func:`assert_equivalent` without raising: the :class:`EquivalenceReport`."""
    fa, fb = functional(a), functional(b)
    names = (f"a ({fa.framework})", f"b ({fb.framework})")
    batches = [_split(x) for x in _batches(inputs)]
    pairing = pairing_for(a, b, fa, fb, batches[0], mapping)
    notes = [pairing.note]
    checker = _Checker(pairing.pairs, names, rtol, atol)
    named_a = pairing.values(0, fa, fa.params, fa.state)
    named_b = pairing.values(1, fb, fb.params, fb.state)
    loss = loss or _mean_square
    checks: list[DiffReport] = []
    planned = ["eval outputs", "gradients"] + [f"training step {k + 1}/{train_steps}" for k in range(train_steps)]

    def done(report: DiffReport, rest: Sequence[str]) -> EquivalenceReport | None:
        checks.append(report)
        if not report:
            return EquivalenceReport(tuple(checks), tuple(rest), tuple(notes))
        return None

    # 1. models: values, and (linen) layers replayed on the same inputs
    models = checker.leaves("models: parameters and statistics", named_a, named_b, paired=True)
    if fa.framework == fb.framework == "linen":
        explained = {pairing.layer_of(p, "linen") for p in models.failing_paths}
        replayed = _linen_layer_replay(fa, fb, a, b, batches[0][0], checker)
        extra = tuple(
            d
            for d in replayed
            if not any(d.path == e or e.startswith(d.path + "/") or d.path.startswith(e + "/") for e in explained)
        )
        models = dataclasses.replace(models, leaves=models.leaves + extra, title="models: values and layers")
    else:
        notes.append("layer replay (naming the layer that computes differently) runs for two linen models only")
    if (r := done(models, planned)) is not None:
        return r

    apply_a = jax.jit(fa.apply, static_argnums=3)
    apply_b = jax.jit(fb.apply, static_argnums=3)

    # 2. eval outputs
    la, lb = {}, {}
    for i, (xa, xb) in enumerate(batches):
        tag = "output" if len(batches) == 1 else f"output[batch {i}]"
        la.update(_outputs(tag, apply_a(fa.params, fa.state, xa, False)[0]))
        lb.update(_outputs(tag, apply_b(fb.params, fb.state, xb, False)[0]))
    if (r := done(checker.leaves("eval outputs", la, lb, paired=False), planned[1:])) is not None:
        return r

    opt = optimizer
    if opt is None and train_steps:
        import optax

        opt = optax.sgd(1e-2)

    def make_step(apply: Callable, train: bool = True) -> Callable:
        """One jitted step: loss, outputs, new statistics, gradients and (with an optimizer, in training) the
        update; ``train=False``: the gradients of the eval-mode computation, nothing updated."""

        def scalar(p, s, x):
            y, new_state = apply(p, s, x, train)
            return loss(y), (y, new_state)

        def step(p, s, o, x):
            if all(jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in jax.tree_util.tree_leaves(x)):
                (_, (y, new_s)), (gp, gx) = jax.value_and_grad(scalar, argnums=(0, 2), has_aux=True)(p, s, x)
            else:  # integer inputs (token ids) have no gradient
                (_, (y, new_s)), gp = jax.value_and_grad(scalar, has_aux=True)(p, s, x)
                gx = None
            if opt is None or not train:
                return y, new_s, gp, gx, p, o
            import optax

            updates, new_o = opt.update(gp, o, p)
            return y, new_s, gp, gx, optax.apply_updates(p, updates), new_o

        return jax.jit(step)

    step_a, step_b = make_step(fa.apply), make_step(fb.apply)

    def state_named(side: int, f: Functional, p: Any, st: Any) -> dict[str, Any]:
        return pairing.state_only(side, f, p, st)

    def params_named(side: int, f: Functional, p: Any) -> dict[str, Any]:
        return pairing.params_only(side, f, p)

    def forward_report(title: str, ra: tuple, rb: tuple, with_state: bool, perm, pa_old=None, pb_old=None):
        """Outputs (training steps), input gradient, parameter gradients (and the statistics the step wrote)."""
        ya, sa_new, gpa, gxa = ra[:4]
        yb, sb_new, gpb, gxb = rb[:4]
        grads_a, grads_b = params_named(0, fa, gpa), params_named(1, fb, gpb)
        gx_a, gx_b = _outputs("grad(input)", gxa), _outputs("grad(input)", _to_a_layout(gxb, perm))
        # every derivative of the one loss is measured against the largest of them
        scale = max(_tree_scale(grads_b), _tree_scale(gx_b))
        parts = [
            checker.leaves(title, _outputs("train output", ya), _outputs("train output", yb), paired=False)
            if with_state
            else DiffReport((), names=checker.names, tolerance=checker.tolerance, title=title),
            checker.leaves(title, gx_a, gx_b, paired=False, tree_scale=scale),
            checker.leaves(title, grads_a, grads_b, paired=True, prefix="grad ", tree_scale=scale),
        ]
        if with_state:
            parts.append(
                checker.leaves(
                    title,
                    state_named(0, fa, pa_old, sa_new),
                    state_named(1, fb, pb_old, sb_new),
                    paired=True,
                    prefix="after step: ",
                )
            )
        return _merge(title, parts)

    # 3. gradients of the eval computation on the first batch
    (xa0, xb0) = batches[0]
    perms = [_layout_perm(xa, xb) for xa, xb in batches]
    eval_a = make_step(fa.apply, train=False)(fa.params, fa.state, None, xa0)
    eval_b = make_step(fb.apply, train=False)(fb.params, fb.state, None, xb0)
    if (r := done(forward_report("gradients", eval_a, eval_b, False, perms[0]), planned[2:])) is not None:
        return r
    oa = ob = None
    if opt is not None:
        oa, ob = opt.init(fa.params), opt.init(fb.params)

    # 4. training: step k is what the optimizer does on batch k
    pa, sa, pb, sb = fa.params, fa.state, fb.params, fb.state
    for k in range(train_steps):
        xa, xb = batches[k % len(batches)]
        title = f"training step {k + 1}/{train_steps}"
        ra, rb = step_a(pa, sa, oa, xa), step_b(pb, sb, ob, xb)
        fwd = forward_report(title, ra, rb, True, perms[k % len(batches)], pa, pb)
        (sa, pa, oa), (sb, pb, ob) = (ra[1], ra[4], ra[5]), (rb[1], rb[4], rb[5])
        parts = [fwd]
        if fwd:  # the update, then the eval outputs it leads to; a difference before explains those after
            parts.append(
                checker.leaves(
                    title,
                    params_named(0, fa, pa),
                    params_named(1, fb, pb),
                    paired=True,
                    prefix="after step: ",
                    tree_scale=True,
                )
            )
        if all(parts):
            ya = _outputs("eval output after step", apply_a(pa, sa, xa, False)[0])
            yb = _outputs("eval output after step", apply_b(pb, sb, xb, False)[0])
            parts.append(checker.leaves(title, ya, yb, paired=False))
        report = next((p for p in parts if not p), None) or _merge(title, parts)
        if (r := done(report, planned[3 + k :])) is not None:
            return r
    return EquivalenceReport(tuple(checks), (), tuple(notes))
