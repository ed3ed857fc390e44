"""Baselines the paper compares RAHF with, each through the library that maintains the method (TRL)."""
