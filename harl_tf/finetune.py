"""``python -m harl_tf.finetune``; installed, the same binary is the console script
``harl-finetune``. The code is :mod:`harl_tf.cli.finetune`."""
from harl_tf.cli.finetune import run

if __name__ == "__main__":
    run()
