"""Pure ASGI middleware, one concern per module (pure ASGI so streaming bodies pass through untouched)."""
