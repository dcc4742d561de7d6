"""``python -m tools.mask_quality`` in a source checkout; installed, the same tool is the
console script ``harl-mask-quality``. The code is :mod:`harl_tf.cli.mask_quality`."""
from harl_tf.cli.mask_quality import run

if __name__ == "__main__":
    run()
