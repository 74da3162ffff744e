"""Measurements against exact truth: enumeration, KL estimators, gradients, credit."""
