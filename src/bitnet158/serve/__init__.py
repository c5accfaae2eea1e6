"""An OpenAI-compatible HTTP server with continuous batching.

The engine runs in a process of its own (engine_process.py), which loads the model: engine.py is its loop,
scheduler.py decides which requests run (admitting queued ones into free cache slots between steps, handing out
prompt tokens within a budget per step, retiring finished and cancelled ones) and runner.py runs the model over
them (prompt chunks and one token per decoding request in one step, then a per-row sampling step).
app.py is the FastAPI application, in the server's own process: it turns HTTP requests into engine requests and
the engine's events into responses (completions.py).
"""

from bitnet158.serve.app import create_app
from bitnet158.serve.engine_process import ModelSource

__all__ = ["ModelSource", "create_app"]
