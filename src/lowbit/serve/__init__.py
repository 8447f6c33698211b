"""``lowbit serve``: an OpenAI-compatible HTTP server over the decode loop.

- :mod:`lowbit.serve.engine`: the request queue and the worker that batches requests;
- :mod:`lowbit.serve.app`: the FastAPI routes (completions, chat, models, health, metrics);
- :mod:`lowbit.serve.limits`: body-size and API-key guard; :mod:`lowbit.serve.metrics`.

Needs the ``serve`` extra (``pip install 'lowbit[serve]'``: fastapi, uvicorn, prometheus-client).
"""
