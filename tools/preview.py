"""``python -m tools.preview`` in a source checkout; installed, the same tool is the
console script ``harl-preview``. The code is :mod:`harl_tf.cli.preview`."""
from harl_tf.cli.preview import run

if __name__ == "__main__":
    run()
