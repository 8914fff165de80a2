"""Tuneline's stages as plain functions, grouped by stage: data/, model/, train/, tune/, evaluate/, ship/."""
