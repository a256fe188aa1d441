"""Frozen models that turn audio or text into the tensors the cache stores."""
