"""Networks: the ResNet encoder, the MLP heads, region pooling and the HARL model."""
