"""Training loops shaped like the ones people write (nanoGPT-style trainers, the PyTorch
examples, GANs, trainer classes), each checking one pattern against plain PyTorch."""
