"""tgserve: a text-generation inference server with TGI's HTTP API."""

__version__ = "0.1.0"
