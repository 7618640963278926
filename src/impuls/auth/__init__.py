"""Who may do what: API keys with scopes (:mod:`.keys`, :mod:`.principal`), and the
audit log of every control-plane change (:mod:`.audit`)."""
