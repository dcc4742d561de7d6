"""``python -m harl_tf.pretrain``; installed, the same binary is the console script
``harl-pretrain``. The code is :mod:`harl_tf.cli.pretrain`."""
from harl_tf.cli.pretrain import run

if __name__ == "__main__":
    run()
