"""Downstream use of a pretrained encoder: linear probe, k-NN, fine-tuning, transfer."""
