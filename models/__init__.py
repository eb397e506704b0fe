"""Network architectures, installed as the package `sdekit_models` (never as a top-level `models`).

sdekit never imports this package; configs name a class here by `module:Class`, e.g. `sdekit_models.mlp:MLP`.
"""
