"""Data contract (Arrow schemas), readers, validator and source adapters."""
