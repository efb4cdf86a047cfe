"""Benchmarks (not tests): the proxy's overhead against a bare-Django floor. Run ``make bench``."""
