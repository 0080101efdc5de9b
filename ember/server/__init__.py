"""The HTTP server: one FastAPI app speaking OpenAI, TGI and Ollama over the same AsyncEngine."""
