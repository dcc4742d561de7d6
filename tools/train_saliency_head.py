"""``python -m tools.train_saliency_head`` in a source checkout; installed, the same tool is the
console script ``harl-train-saliency-head``. The code is :mod:`harl_tf.cli.train_saliency_head`."""
from harl_tf.cli.train_saliency_head import run

if __name__ == "__main__":
    run()
