"""Training: options, the loop, optimizers, noise and loss."""
