"""The command-line tools: TFRecord builder, mask tools, previews, background shifts and
weight conversion. Each is a thin absl program over library code in ``harl_tf``: it parses
flags, calls the library and reports errors through :func:`harl_tf.errors.run_binary`
(``<tool>: error: <message>``, one line, exit status 2).

Run them as console scripts (``harl-build-tfrecords``, ``harl-generate-masks``, ... see
setup.py) or, from a source checkout, as ``python -m tools.<name>`` (``tools/`` holds one
two-line entry point per tool).
"""
