"""The package version, on the lowest floor so every module can record it without importing the package root."""
__version__ = "0.1.0"
