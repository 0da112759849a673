"""Integrations with other training frameworks (optional extras): :mod:`rigl_ds.integrations.hf`
(Hugging Face Trainer; ``pip install rigl_ds[hf]``)."""
