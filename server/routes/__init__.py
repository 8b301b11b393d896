"""Thin routers: parse the request with vLLM's protocol models, pick the model's engine, delegate to vLLM's
serving object, turn its result into a response. Each module has `attach_router(app)`."""
