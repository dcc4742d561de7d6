"""``python -m tools.generate_masks`` in a source checkout; installed, the same tool is the
console script ``harl-generate-masks``. The code is :mod:`harl_tf.cli.generate_masks`."""
from harl_tf.cli.generate_masks import run

if __name__ == "__main__":
    run()
