"""Small web backends built on breadasync: an aiohttp app and a FastAPI app.

Run them from the repository's root (``python -m examples.aiohttp_app``, ``uvicorn
examples.fastapi_app:app``); ``tests/test_examples.py`` serves both under their real servers.
"""
