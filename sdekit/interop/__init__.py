"""Adapters that run sdekit's SDEs and score functions through other solver libraries.

`torchsde` (torch) and `diffrax` (JAX) are separate modules; import the one you need. JAX is
imported only inside `sdekit.backends.diffrax`, so `import sdekit` never pays for it.
"""
