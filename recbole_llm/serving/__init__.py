"""Serving an exported artifact without torch or RecBole: the runtime (Recommender) and the HTTP service."""
