"""Tuneline's Prefect flow and command line: thin callers of the stage functions in tasks/."""
