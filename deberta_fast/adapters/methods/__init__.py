"""One module per adapter method that is not part of the original flat layout (invertible adapters, ...)."""
