"""The one place the version is written; ``setup.py`` reads it from here."""

__version__ = "0.2.0"
