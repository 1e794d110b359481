"""Video decoding, clip datasets, the embedded demo dataset and latent extraction."""
