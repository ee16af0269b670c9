"""mi_crow: mechanistic interpretability for language models with accelerated TopK sparse autoencoders."""

__version__ = "0.1.0"
