import os
import sys

from experiments.cli import main, stop_on_sigterm

stop_on_sigterm()
code = main()
# Ctrl-C, SIGTERM: XLA may still be compiling on a thread that interpreter shutdown crashes (exit 139)
if code in (130, 143):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
