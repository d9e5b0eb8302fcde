"""Sparse autoencoders: training, the sae_lens layout, decoder-direction clusters (Engels et al. 2024)."""
