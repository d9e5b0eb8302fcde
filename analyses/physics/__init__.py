"""Physics of Language Models (Allen-Zhu & Li) parts 1, 2.1, 2.2: synthetic data, training, probes."""
