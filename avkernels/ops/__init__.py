"""Custom ops: each file holds one op's schema, PyTorch reference, fake kernel and autograd."""
