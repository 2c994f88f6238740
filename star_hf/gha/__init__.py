"""The GHA math: Sanger's rule in statistics form, its guarded updates and the initial tensors.

Plain torch; knows nothing of Transformers, routers or training frameworks.
"""
