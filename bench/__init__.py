"""Benchmark harness: the deploy pipeline against its floors, measured in one run.

``./dev bench [options]`` (``python -m bench``); see :mod:`bench.__main__` for the options.
"""
