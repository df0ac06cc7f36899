"""The numerics of training: losses and the token log-probs they are built from."""
