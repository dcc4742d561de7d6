"""``python -m tools.export_torchvision`` in a source checkout; installed, the same tool is the
console script ``harl-export-torchvision``. The code is :mod:`harl_tf.cli.export_torchvision`."""
from harl_tf.cli.export_torchvision import run

if __name__ == "__main__":
    run()
