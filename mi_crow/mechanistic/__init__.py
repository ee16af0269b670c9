"""Mechanistic interpretability on top of saved activations: sparse autoencoders (`mi_crow.mechanistic.sae`)."""
