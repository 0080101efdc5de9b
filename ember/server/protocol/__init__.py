"""Pydantic request models and response builders, one file per wire protocol."""
