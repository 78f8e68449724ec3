"""generators: a generative recommender (Mult-VAE) for recsvc."""
