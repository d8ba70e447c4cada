"""tileseg train: data, the training loop, the shipped real-image checks."""
