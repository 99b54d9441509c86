"""Smoke tests of the benchmark harness (benchmarks/bench.py), in quick mode on tiny inputs.

These check that the harness runs every facade against its native layer and produces sane rows
(finite ratios, matching outputs, an HLO verdict); they assert nothing about speed.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import re
import sys
from types import ModuleType

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("normbridge_bench", ROOT / "benchmarks" / "bench.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _finite_row(bench: ModuleType, r: object) -> None:
    for name in ("fwd_ratio", "bwd_ratio", "compile_ratio"):
        v = getattr(r, name)
        assert math.isfinite(v) and v > 0, (name, v)
    for name in ("fwd_native_ms", "fwd_facade_ms", "bwd_native_ms", "bwd_facade_ms"):
        assert getattr(r, name) > 0, name
    assert r.reps >= bench.QUICK_TIMING.min_reps  # every function got its repetitions


@pytest.mark.parametrize(
    ("facade", "layer"),
    [("linen", "bn_train"), ("nnx", "layernorm"), ("equinox", "groupnorm"), ("treex", "bn_eval")],
)
def test_quick_case_produces_a_row(bench: ModuleType, facade: str, layer: str) -> None:
    """One tiny case per facade: the facade imports, runs, agrees with native and gets finite ratios."""
    r = bench.run_case(facade, layer, "tfm_f32", quick=True, hlo=False)
    _finite_row(bench, r)
    assert (r.facade, r.layer, r.shape, r.dtype) == (facade, bench.LAYERS[layer], "tfm_f32", "float32")
    # the two sides did the same work: output and gradients agree within float32 tolerance
    assert r.max_rel_diff <= 1e-5, r
    assert r.notes == []


def test_native_against_itself_is_identical(bench: ModuleType) -> None:
    """The harness's own checks are live: native vs native gives bitwise results and the same HLO."""
    r = bench.run_case("linen", "rmsnorm", "tfm_f32", quick=True, native_as_facade=True)
    _finite_row(bench, r)
    assert r.max_abs_diff == 0.0
    assert r.hlo == "same / same"


def test_hlo_comparison_tells_programs_apart(bench: ModuleType) -> None:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((8, 16))
    f = jax.jit(lambda x: jnp.sum(x * 2.0, axis=-1))
    g = jax.jit(lambda y: jnp.sum(y * 2.0, axis=-1))  # same program, different Python names
    h = jax.jit(lambda x: jnp.sum(x * 3.0, axis=0))
    tf, tg, th = (bench.compiled_text(fn, (x,)) for fn in (f, g, h))
    assert tf is not None and th is not None
    assert bench.canonical_hlo(tf) == bench.canonical_hlo(tg)
    assert bench.canonical_hlo(tf) != bench.canonical_hlo(th)
    assert bench.entry_kernels(tf) >= 1
    # a program with an extra x-sized pass has one more big kernel
    two = jax.jit(lambda x: (x * 2.0, jnp.exp(x)))
    k1, big1 = bench.kernel_profile(tf)
    k2, big2 = bench.kernel_profile(bench.compiled_text(two, (x,)))
    assert (k1, big1) == (1, 1) and (k2, big2) == (2, 2)


def test_max_diff_sees_differences_and_missing_leaves(bench: ModuleType) -> None:
    import numpy as np

    a = {"y": np.array([1.0, 2.0], np.float32), "g": np.array([4.0], np.float32)}
    b = {"y": np.array([1.0, 2.5], np.float32), "g": np.array([4.0], np.float32)}
    notes: list[str] = []
    assert bench.max_diff(a, a, notes) == (0.0, 0.0)
    d_abs, d_rel = bench.max_diff(a, b, notes)
    assert d_abs == pytest.approx(0.5) and d_rel == pytest.approx(0.5 / 4.0)  # relative to the tree's max
    assert notes == []
    bench.max_diff(a, {**b, "extra": np.zeros(2, np.float32)}, notes)
    assert notes and "extra" in notes[0]
    assert bench.max_diff(a, {"other": np.zeros(1, np.float32)}) == (math.inf, math.inf)


def test_main_writes_markdown_table(bench: ModuleType, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "results.md"
    rc = bench.main(
        ["--quick", "--no-reexec", "--no-hlo", "--facade", "linen", "--facade", "equinox", "--layer", "instancenorm",
         "--shape", "tfm_bf16", "--markdown", str(out)]
    )
    assert rc == 0
    text = out.read_text()
    assert not (tmp_path / "results.md.tmp").exists()
    assert bench.md_header() in text and "max\\|Δ\\|" in bench.md_header()
    # every row has as many cells as the header (no unescaped pipe)
    n_cells = len(re.split(r"(?<!\\)\|", bench.md_header()))
    assert all(len(re.split(r"(?<!\\)\|", ln)) == n_cells for ln in text.splitlines() if ln.startswith("| "))
    rows = [ln for ln in text.splitlines() if ln.startswith(("| linen", "| equinox"))]
    assert len(rows) == 1 and "| linen | InstanceNorm | tfm_bf16 | bfloat16 |" in rows[0]
    # equinox has no InstanceNorm: skipped with a message, not silently
    assert "equinox InstanceNorm tfm_bf16: equinox has no InstanceNorm" in text
    assert "skipped: equinox InstanceNorm" in capsys.readouterr().out


def test_ratio_above_target_is_bold(bench: ModuleType) -> None:
    r = bench.Result("linen", "LayerNorm", "tfm_f32", "float32", 1.0, 1.2, 2.0, 2.0, 1.0, 1.0, 0.0, 0.0, "same", 5)
    cells = dict(zip(bench.COLUMNS, bench.row_cells(r)))
    assert cells["fwd ratio"] == "**1.20**" and cells["fwd+bwd ratio"] == "1.00"
    md = bench.to_markdown([r], ["--quick"], 1.0, True, [])
    assert "1 cases; 1 with a ratio above 1.05." in md


def test_ratios_above_target_are_explained(bench: ModuleType) -> None:
    R = bench.Result
    noise = R("linen", "BatchNorm eval", "tfm_f32", "float32", 1.0, 1.2, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, "same / same", 5,
              recheck=(0.98, 1.0))
    extra = R("nnx", "WeightNorm(Dense)", "dense_f32", "float32", 1.0, 1.0, 1.0, 1.2, 1.0, 1.0, 0.0, 0.0,
              "7→8k (big 4→5) / 14→17k (big 10→13)", 5)
    small = R("treex", "BatchNorm train", "tfm_f32", "float32", 1.0, 1.0, 1.0, 1.1, 1.0, 1.0, 0.0, 0.0,
              "8→9k (big 3→3) / 17→18k (big 9→9)", 5)
    assert bench.explain(noise) == [
        "fwd 1.20: identical optimized program (HLO same), so the difference is outside XLA: per-call host "
        "work (flattening the arguments) or machine noise; in-run repeat 0.98 (did not repeat)"
    ]
    assert "3 more big kernel(s) (10→13" in bench.explain(extra)[0]
    assert "differ only in parameter-sized ops (17→18 kernels)" in bench.explain(small)[0]
    md = bench.to_markdown([noise, extra, small], [], 1.0, False, [])
    assert "### Ratios above 1.05" in md and md.count("\n- ") >= 3


def test_readme_shows_the_committed_results(bench: ModuleType) -> None:
    """The README's benchmark table is the one in benchmarks/results.md (written by --readme), not a stale copy."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    results = (ROOT / "benchmarks" / "results.md").read_text(encoding="utf-8")
    assert bench.splice_readme(readme, results) == readme
    shown = readme.split(bench.README_START, 1)[1].split(bench.README_END, 1)[0]
    assert bench.SUMMARY_HEADER in shown  # the per-facade summary of the table, not only the notes
    assert "| linen | " in shown
    fast = (ROOT / "benchmarks" / "results_fast.md").read_text(encoding="utf-8")
    assert bench.splice_versus_readme(readme, fast) == readme  # written by --versus --readme
    assert "| " + " | ".join(bench.VERSUS_SUMMARY_COLUMNS) + " |" in readme  # compact; the full table in results_fast


def test_splice_readme_replaces_only_the_marked_block(bench: ModuleType) -> None:
    R = bench.Result
    rows = [R("linen", "LayerNorm", "tfm_f32", "float32", 1.0, 1.2, 2.0, 2.0, 1.0, 1.0, 0.0, 0.0, "same / same", 5,
              recheck=(1.1, 1.0)),
            R("linen", "RMSNorm", "tfm_f32", "float32", 1.0, 0.9, 2.0, 2.2, 1.0, 1.0, 0.0, 0.0, "same / same", 5),
            R("nnx", "LayerNorm", "tfm_f32", "float32", 1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 0.0, 0.0, "4→5k (big 1→2) / ?",
              5)]
    md = bench.to_markdown(rows, [], 1.0, False, [])
    readme = f"intro\n{bench.README_START}\nold table\n{bench.README_END}\noutro\n"
    out = bench.splice_readme(readme, md)
    block = out.split(bench.README_START + "\n", 1)[1].split(bench.README_END, 1)[0]
    assert out.startswith("intro\n") and out.endswith(f"{bench.README_END}\noutro\n")
    assert bench.SUMMARY_HEADER in block and "old table" not in block
    # per facade: cases, median (max) ratios, cases above target (repeated in the recheck), HLO same
    assert "| linen | 2 | 1.05 (1.20) | 1.05 (1.10) | 2 (1) | 2 / 2 |" in block
    assert "| nnx | 1 | 1.00 (1.00) | 1.00 (1.00) | 0 (0) | 0 / 0 |" in block
    assert "3 cases; 2 with a ratio above 1.05." in block
    with pytest.raises(ValueError, match="markers"):
        bench.splice_readme("no markers here", md)


def test_versus_quick_case(bench: ModuleType) -> None:
    """--versus: every native framework, each facade in exact and fast mode, and the anchor, one run."""
    r = bench.run_versus_case("groupnorm", "tfm_f32", quick=True, hlo=False)
    assert {"native linen", "native nnx", "native equinox", "linen exact", "linen fast", "equinox fast"} <= set(r.ms)
    assert all(v > 0 and math.isfinite(v) for pair in r.ms.values() for v in pair) and r.anchor_ms > 0
    assert r.reps >= bench.QUICK_TIMING.min_reps
    # fast mode computed the same thing as exact mode (the accuracy contract is tested in tests/core)
    assert set(r.fast_vs_exact) == {"linen", "nnx", "equinox"}
    assert all(d <= 1e-5 for d in r.fast_vs_exact.values()), r.fast_vs_exact
    md = bench.versus_markdown([r], ["--versus"], 1.0, True, ["InstanceNorm x: because"])
    row = next(ln for ln in md.splitlines() if ln.startswith("| GroupNorm(32) | tfm_f32 |"))
    assert len(re.split(r"(?<!\\)\|", row)) == len(bench.VERSUS_COLUMNS) + 2
    assert "#### GroupNorm(32), tfm_f32" in md and "- InstanceNorm x: because" in md
    readme = f"a\n{bench.VERSUS_README_START}\nold\n{bench.VERSUS_README_END}\nb\n"
    spliced = bench.splice_versus_readme(readme, md)
    summary = bench.versus_summary_row(row)
    assert summary.startswith("| GroupNorm(32) | tfm_f32 | ")
    assert summary.count("|") == len(bench.VERSUS_SUMMARY_COLUMNS) + 1
    # every phase was timed in the same rounds (paired), A/A control included
    for phase in (0, 1):
        lengths = {len(v[phase]) for v in r.samples.values()} | {len(r.aa[phase][1])}
        assert len(lengths) == 1, lengths
        med, lo, hi = r.paired(r.best_fast(phase)[0], phase)
        assert lo <= med <= hi
        assert r.aa[phase][0] in ("linen", "nnx", "equinox")
    assert summary in spliced and row not in spliced and "old" not in spliced
    assert spliced.endswith(f"{bench.VERSUS_README_END}\nb\n")


def test_versus_skips_a_layer_no_facade_has(bench: ModuleType) -> None:
    with pytest.raises(bench.Unsupported, match="InstanceNorm"):
        bench.run_versus_case("instancenorm", "tfm_f32", facades=("equinox",), quick=True, hlo=False)


def test_weightnorm_like_for_like_case_trains_the_gains_on_both_sides(bench: ModuleType) -> None:
    """nnx's like-for-like WeightNorm case: native's gains are made Params, so both sides return the same gradients."""
    plain = bench.run_case("nnx", "weightnorm", "dense_f32", quick=True, hlo=False)
    assert plain.notes and "facade-only" in plain.notes[0]  # native never trains its gains: one gradient fewer
    same = bench.run_case("nnx", "weightnorm_trained", "dense_f32", quick=True, hlo=False)
    _finite_row(bench, same)
    assert same.notes == [] and same.max_rel_diff <= 1e-6, same
    with pytest.raises(bench.Unsupported, match="nnx-only"):
        bench.run_case("linen", "weightnorm_trained", "dense_f32", quick=True, hlo=False)


def test_median_interval_is_the_order_statistic_interval(bench: ModuleType) -> None:
    # n = 16: P(B(16, 1/2) <= 3) = 697/65536 = 0.0106 <= 0.025 < P(B <= 4) = 0.038, so [v_(4), v_(13)]
    assert bench.median_interval([float(v) for v in range(16, 0, -1)]) == (8.5, 4.0, 13.0)
    # n = 100: the textbook interval [v_(40), v_(61)]
    assert bench.median_interval(list(range(1, 101))) == (50.5, 40, 61)
    # too few values for 95 %: the whole range
    assert bench.median_interval([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert bench.paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError, match="same rounds"):
        bench.paired_ratios([1.0], [1.0, 2.0])


def test_kernel_structure_counts_x_sized_reads_and_writes(bench: ModuleType) -> None:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((256, 64))
    one = bench.compiled_text(jax.jit(lambda x: x * 2.0), (x,))
    # mean over rows then x - mean: XLA:CPU reads x in the reduction and again in the subtraction
    two = bench.compiled_text(jax.jit(lambda x: (x - x.mean(0), x * 3.0)), (x,))
    s1, s2 = bench.kernel_structure(one), bench.kernel_structure(two)
    assert [(r, w) for _, r, w in s1] == [(1, 1)]
    assert sum(r for _, r, _ in s2) >= 2 and sum(w for _, _, w in s2) == 2
    assert bench.fmt_structure(s1).endswith("(2 x-passes)")


def _versus(bench: ModuleType, fast: list[float], native: list[float], *, same: bool, aa: list[float] | None = None):
    prog = ("P", "Q")
    s = (("fusion", 1, 1),)
    return bench.VersusResult(
        "LayerNorm", "tfm_f32", "float32", 1.0,
        {"native linen": (1.0, 1.0), "linen exact": (1.0, 1.0), "linen fast": (1.0, 1.0)}, {}, {}, len(fast),
        programs={"native linen": prog, "linen exact": prog, "linen fast": prog if same else ("R", "S")},
        samples={"native linen": (native, native), "linen exact": (native, native), "linen fast": (fast, fast)},
        aa={0: ("linen", aa or native), 1: ("linen", aa or native)},
        structure={"native linen": (s, s), "linen exact": (s, s), "linen fast": (s, s)},
    )


def test_versus_verdicts(bench: ModuleType) -> None:
    native = [1.0] * 16
    below = _versus(bench, [0.9] * 16, native, same=False)
    assert below.verdict(0)[0] == "≤ 1.00" and below.paired("linen", 0) == (0.9, 0.9, 0.9)
    same = _versus(bench, [1.1] * 16, native, same=True, aa=[1.05] * 16)
    assert same.verdict(0)[0] == "same program" and "A/A control (native linen twice) 1.05" in same.verdict(0)[1]
    # a noisy different program whose interval reaches below 1.00, with the same kernels
    noisy = _versus(bench, [0.95, 1.2] * 8, native, same=False)
    assert noisy.verdict(1)[0] == "CI ∋ 1.00, same kernels" and "fusion 1R/1W" in noisy.verdict(1)[1]
    slower = _versus(bench, [1.2] * 16, native, same=False)
    assert slower.verdict(0)[0] == "**slower**"
    assert bench.versus_count_line([below, same, slower]).startswith("3 cases, 6 phases; 2 at a paired median")
