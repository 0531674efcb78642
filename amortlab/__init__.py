"""amortlab: train, compare and diagnose amortized inference in VAEs."""
__version__ = "0.1.0"
