"""An OpenAI-compatible HTTP server and chat page for mPLUG-Owl (`python -m owl_jax.serve --checkpoint DIR`).

from owl_jax.serve import make_server
server = make_server(model, processor, port=0)   # model, processor = owl_jax.from_pretrained(...)
threading.Thread(target=server.serve_forever, daemon=True).start()
...                                               # POST f"{server.url}/v1/chat/completions"
server.shutdown(); server.server_close()
"""

from owl_jax.serve.errors import ApiError
from owl_jax.serve.server import DEFAULT_MODEL_NAME, OwlServer, make_server

__all__ = ["ApiError", "DEFAULT_MODEL_NAME", "OwlServer", "make_server"]
