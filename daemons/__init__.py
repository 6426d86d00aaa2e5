"""onebox: a private AI stack for one Linux box (one package per daemon)."""

__version__ = "0.1.0"
