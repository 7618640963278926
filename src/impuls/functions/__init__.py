"""Functions: their fields and rules (:mod:`.models`), storage and versions
(:mod:`.registry`), and the built packages instances run from (:mod:`.packages`)."""
