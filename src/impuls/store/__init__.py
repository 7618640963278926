"""Persistence: the database (SQLAlchemy + Alembic) and content-addressed code blobs."""
