"""Adapter Hub: a versioned registry of adapter artifacts (this package) and a runtime that serves them."""
