import sys

from flaxlab import parallel

parallel.split_cpu_devices()  # before anything starts jax's backends

from experiments.cli import main  # noqa: E402

sys.exit(main())
