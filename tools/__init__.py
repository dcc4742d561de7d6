"""Command-line tools: TFRecord builder, mask tools, previews, weight conversion, the
quickstart. Each is a thin absl CLI over library code in ``harl_tf``."""
