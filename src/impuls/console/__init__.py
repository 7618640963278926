"""The web console at ``/console/``: server-rendered pages over the same registry, engine and
keys as the API (a door, like ``api/``), signed in with an Impuls key (see ``session.py``)."""
