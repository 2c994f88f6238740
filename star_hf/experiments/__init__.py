"""Experiment machinery: text data, evaluation, training runs, the demo and its report, plots.

Needs the ``experiments`` extra (``pip install "star_hf[experiments]"``: datasets, matplotlib). Nothing in
the core library imports this package; the ``star-hf demo`` command does.
"""
