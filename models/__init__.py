"""Network architectures. sdekit never imports this package; configs name a class here by `module:Class`."""
