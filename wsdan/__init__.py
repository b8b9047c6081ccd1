"""WS-DAN: Weakly Supervised Data Augmentation Network (Hu et al., arXiv:1901.09891)."""

__version__ = "0.1.0"
