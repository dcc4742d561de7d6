"""Data: the embedded synthetic set, the TFRecord schema, the builder and the input
pipelines."""
