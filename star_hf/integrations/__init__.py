"""Integrations with other libraries (each installs itself when imported by ``star_hf``)."""
