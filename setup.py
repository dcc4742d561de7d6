"""harl-tf: Heuristic Attention Representation Learning in TensorFlow 2 / Keras 3.

TensorFlow comes from exactly one extra, so that exactly one TensorFlow distribution is
ever installed: ``[cpu]`` (the ``tensorflow-cpu`` wheel, the default in the README) or
``[gpu]`` (``tensorflow[and-cuda]``). Every other extra adds no TensorFlow of its own.
"""
from setuptools import find_packages, setup

TF_VERSION = "2.21.0"

REQUIRES = [
    "keras==3.15.1",
    "absl-py>=2.1,<3",
    "numpy>=1.26,<3",
    "tensorflow-datasets==4.9.10",
    "opencv-contrib-python-headless==5.0.0.93",  # ximgproc (graph segmentation), saliency
    "pillow>=10",
    "scipy>=1.11",
    "tqdm>=4.66",
    "tensorboard>=2.20",
]

EXTRAS = {
    "cpu": [f"tensorflow-cpu=={TF_VERSION}"],
    "gpu": [f"tensorflow[and-cuda]=={TF_VERSION}"],
    "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100"],
    "onnx": ["tf2onnx==1.17.0", "onnxruntime>=1.20"],
    "bench": ["scikit-image>=0.24", "matplotlib>=3.8", "scikit-learn>=1.4"],
    # Data preparation on Apache Beam (harl_tf/data/beam_build.py). 2.77.0 pins protobuf
    # 6.33, inside TensorFlow 2.21's range; google-crc32c lets Beam workers write TFRecords
    # without importing TensorFlow.
    "beam": ["apache-beam==2.77.0", "google-crc32c>=1.5"],
}

# The tools' code lives in harl_tf/cli/; tools/<name>.py in a source checkout are two-line
# entry points for `python -m tools.<name>`. Only harl_tf is installed: no top-level
# "tools" package in site-packages (a generic name other projects use too). The quickstart
# (python -m tools.quickstart) runs from a source checkout only: it reads flags/*.cfg.
CONSOLE_SCRIPTS = [
    "harl-pretrain = harl_tf.cli.pretrain:run",
    "harl-finetune = harl_tf.cli.finetune:run",
    "harl-export = harl_tf.cli.export:run",
    "harl-build-tfrecords = harl_tf.cli.build_tfrecords:run",
    "harl-generate-masks = harl_tf.cli.generate_masks:run",
    "harl-train-saliency-head = harl_tf.cli.train_saliency_head:run",
    "harl-bootstrap-masks = harl_tf.cli.bootstrap_masks:run",
    "harl-mask-quality = harl_tf.cli.mask_quality:run",
    "harl-preview = harl_tf.cli.preview:run",
    "harl-export-torchvision = harl_tf.cli.export_torchvision:run",
    "harl-shift-backgrounds = harl_tf.cli.shift_backgrounds:run",
]

setup(
    name="harl-tf",
    version="0.1.0",
    description=("HARL: Heuristic Attention Representation Learning for self-supervised "
                 "pretraining, in TensorFlow 2 / Keras 3"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["harl_tf", "harl_tf.*"]),
    install_requires=REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    license="Apache-2.0",
)
