"""Command-line conventions shared by every pipeline (flags, list syntax, exit codes): see common.py."""
