"""flaxlab: university deep-learning course experiments, reimplemented in JAX/Flax.

Everything a command-line run does is importable from here, so a Colab session can call
`flaxlab.runner.run_experiment(config, workdir)` directly.
"""
__version__ = "0.1.0"
