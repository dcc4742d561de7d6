"""``python -m tools.shift_backgrounds`` in a source checkout; installed, the same tool is the
console script ``harl-shift-backgrounds``. The code is :mod:`harl_tf.cli.shift_backgrounds`."""
from harl_tf.cli.shift_backgrounds import run

if __name__ == "__main__":
    run()
