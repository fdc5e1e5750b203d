"""What quantization costs in quality: a small model with trained weights that exists offline (train.py)
and the comparison of a scheme's next-token distributions with float32's on held-out text (compare.py)."""
