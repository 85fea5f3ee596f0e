"""fal's queue: the shared request store, the worker that runs queued requests, its routes and webhooks."""
