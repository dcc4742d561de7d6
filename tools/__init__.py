"""Entry points for ``python -m tools.<name>`` in a source checkout. Each tool's code is in
:mod:`harl_tf.cli` (installed, with a console script ``harl-<name>``); this package is not
installed. The quickstart is a checkout-only script of its own."""
