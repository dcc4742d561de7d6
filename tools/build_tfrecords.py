"""``python -m tools.build_tfrecords`` in a source checkout; installed, the same tool is the
console script ``harl-build-tfrecords``. The code is :mod:`harl_tf.cli.build_tfrecords`."""
from harl_tf.cli.build_tfrecords import run

if __name__ == "__main__":
    run()
