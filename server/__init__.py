"""Gateway: FastAPI app, protocol adapters (legacy, realtime v2), worker pool and queue. No torch."""
