"""Without flax, importing the linen facade fails with an ImportError naming the pip extra."""

from __future__ import annotations

import subprocess
import sys


def test_missing_flax_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['flax'] = None; sys.modules['flax.linen'] = None\n"
        "import normbridge.core\n"
        "try:\n    import normbridge.adapters.linen\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERR" in out.stdout, out.stderr[-2000:]
    assert "normbridge[linen]" in out.stdout
