"""The OpenAI-compatible frontend: discovery, preprocessing, routing, streaming."""
