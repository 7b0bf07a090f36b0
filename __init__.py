"""bertpool: serve BERT sentence-pair classification from a pool of accelerator workers."""

__version__ = "0.1.0"
