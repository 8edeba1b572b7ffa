"""The OpenAI-compatible server over the engine: app.py (routes), schemas.py (request bodies), metrics.py."""
