"""Impuls: a self-hosted serverless function platform."""

__version__ = "0.1.0"
