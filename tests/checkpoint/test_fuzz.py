"""Every reader fuzzed with damaged real files: truncations, bit flips, spliced and repeated chunks.

Only normbridge's own errors may come out, every case must return within a time bound, and the
peak RSS of a case (the kernel's high-water mark, reset before each) stays bounded by the file size.
Sizes: the hypothesis profile (``ci``: 8 examples per reader; ``HYPOTHESIS_PROFILE=thorough``: 200).
The number of inputs each reader saw is printed at the end of the module (``-s``) and kept in
:data:`SEEN`.
"""

from __future__ import annotations

import collections
import os
import pathlib
import shutil
import signal
import tempfile
import time
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normbridge import checkpoint as ck
from normbridge.errors import CheckpointError

TIME_BOUND_S = 20.0
SEEN: collections.Counter[str] = collections.Counter()
ESCAPED: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print("\nfuzz inputs per reader:", dict(SEEN), "escaped:", ESCAPED)


def _mutate(data: bytes, ops: list[tuple[str, int, int, int]]) -> bytes:
    for op, a, b, c in ops:
        n = len(data)
        if n == 0:
            break
        i, j = sorted((a % n, b % (n + 1)))
        if op == "truncate":
            data = data[: a % n]
        elif op == "flip":
            data = data[:i] + bytes([data[i] ^ (1 << (c % 8))]) + data[i + 1 :]
        elif op == "splice":  # a chunk of the file pasted somewhere else
            k = c % n
            data = data[:k] + data[i:j][:4096] + data[k:]
        elif op == "repeat":
            data = data[:j] + data[i:j][:4096] * (1 + c % 3) + data[j:]
        elif op == "zero":
            data = data[:i] + bytes(min(j - i, 64)) + data[j:]
    return data


ops = st.lists(
    st.tuples(st.sampled_from(["truncate", "flip", "splice", "repeat", "zero"]), st.integers(0, 2**31),
              st.integers(0, 2**31), st.integers(0, 2**16)),
    min_size=1, max_size=4,
)


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; return the current RSS.
    (``tracemalloc`` is not used: with TensorStore's threads it crashes the interpreter.)"""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status("VmRSS:")


def _peak_rss() -> int:
    return _status("VmHWM:")


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def _read_bounded(path: pathlib.Path, size: int, fmt: str | None = None) -> None:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_BOUND_S)
    base = _reset_peak_rss()
    t0 = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ck.read(path, format=fmt)
    except CheckpointError as err:
        assert str(path) in str(err) or str(path.name) in str(err), f"error does not name the file: {err}"
    except _Timeout:
        pytest.fail(f"reading a damaged file took more than {TIME_BOUND_S}s")
    except BaseException as err:  # a foreign exception escaped: the defect this test exists for
        ESCAPED.append(f"{type(err).__name__}: {err}")
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.monotonic() - t0 < TIME_BOUND_S
    grown = _peak_rss() - base
    assert grown < 256 * 2**20 + 20 * size, f"peak RSS grew {grown} bytes reading a {size}-byte file"


FILE_FORMATS = ["msgpack", "msgpack-treex", "safetensors", "npz", "eqx-leaves", "equinox", "pickle",
                "pickle-cloud", "pickle-0"]


@pytest.mark.parametrize("name", FILE_FORMATS)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, forced=st.booleans())
def test_damaged_file_gives_only_normbridge_errors(real_files, tmp_path, name, ops, forced):
    """Detected from content, or with the format forced (``--format``): the reader itself must hold."""
    data = _mutate(real_files[name].read_bytes(), ops)
    path = tmp_path / f"damaged-{name}"
    path.write_bytes(data)
    fmt = name.split("-")[0] if name not in ("eqx-leaves",) else name
    SEEN[name] += 1
    _read_bounded(path, len(data), fmt if forced else None)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, which=st.integers(0, 2**16))
def test_damaged_orbax_directory_gives_only_normbridge_errors(real_files, ops, which):
    src = real_files["orbax"]
    with tempfile.TemporaryDirectory() as tmp:
        dst = pathlib.Path(tmp) / "ck"
        shutil.copytree(src, dst)
        files = sorted(p for p in dst.rglob("*") if p.is_file())
        victim = files[which % len(files)]
        victim.write_bytes(_mutate(victim.read_bytes(), ops))
        SEEN["orbax"] += 1
        _read_bounded(dst, sum(p.stat().st_size for p in files))


@pytest.mark.parametrize("name", FILE_FORMATS)
def test_every_reader_reads_its_undamaged_file(real_files, name):
    """The fuzz starts from files that do read (else it would only test the error path); the
    protocol-0 pickle of a plain dict reaches the restricted unpickler, which says it is no module."""
    if name == "pickle-0":
        assert ck.detect_format(real_files[name]) == "pickle"
        with pytest.raises(CheckpointError, match="does not hold a treex module"):
            ck.read(real_files[name])
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = ck.read(real_files[name])
    assert c.leaves and c.format == name.split("-")[0] if name != "eqx-leaves" else c.format == "eqx-leaves"
    assert os.path.samefile(c.file, real_files[name])


def test_found_by_the_thorough_profile_flipped_pickle_build_state(real_files, tmp_path):
    """A bit flip at byte 434 of the treex pickle: the restricted unpickler's refusal names no file;
    the reader adds it (found by HYPOTHESIS_PROFILE=thorough)."""
    data = bytearray(real_files["pickle"].read_bytes())
    data[434] ^= 1 << 1
    path = tmp_path / "flipped.pkl"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        ck.read(path)
    assert str(e.value).startswith(f"{path}: ") and e.value.file == str(path)
