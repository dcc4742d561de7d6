"""``python -m tools.bootstrap_masks`` in a source checkout; installed, the same tool is the
console script ``harl-bootstrap-masks``. The code is :mod:`harl_tf.cli.bootstrap_masks`."""
from harl_tf.cli.bootstrap_masks import run

if __name__ == "__main__":
    run()
