import os
import sys

from normbridge.cli import main

code = main()
# Everything normbridge has to say is printed by now. TensorStore (under Orbax) can still print
# "RuntimeError: Event loop is closed" from its threads while the interpreter shuts down after a
# damaged checkpoint; that repeat of an already reported error is dropped.
sys.stdout.flush()
sys.stderr.flush()
os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
raise SystemExit(code)
