"""nkservice: the NkSERVICE External API server, its Python client and its command line."""

__version__ = "0.1.0"
