"""Illustration classification research repo: every stage a function and a command."""

__version__ = "0.1.0"
