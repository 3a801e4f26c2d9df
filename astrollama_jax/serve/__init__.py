"""Serving: an OpenAI-compatible HTTP API and the expert feedback page (``python -m
astrollama_jax.serve``).

``batching`` (the bounded queue and the worker that runs concurrent requests through one
``generate`` call), ``openai_api`` (request checking, answers, stream chunks, error bodies),
``server`` (HTTP, the page, ratings into ``astrollama_jax.feedback.store``), ``static/`` (the page).
"""
