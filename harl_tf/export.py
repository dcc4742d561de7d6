"""``python -m harl_tf.export``; installed, the same binary is the console script
``harl-export``. The code is :mod:`harl_tf.cli.export`."""
from harl_tf.cli.export import run

if __name__ == "__main__":
    run()
